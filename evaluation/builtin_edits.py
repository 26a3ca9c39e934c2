"""A small edit set written for editkit: counterfactual edits of facts the default model
(SmolLM2-135M-Instruct) knows, each with a rephrasing and unrelated probes. Used by the demo
and by tests on a fresh machine without ../shared."""

BUILTIN_EDITS = [
    {
        "prompt": "The Eiffel Tower is located in the city of",
        "target_new": "Rome",
        "subject": "Eiffel Tower",
        "target_old": "Paris",
        "rephrases": ["The city where the Eiffel Tower stands is"],
        "locality": [{"prompt": "The capital of Germany is", "answer": "Berlin"},
                     {"prompt": "The Colosseum is located in the city of", "answer": "Rome"}],
    },
    {
        "prompt": "The largest planet in the solar system is",
        "target_new": "Saturn",
        "subject": "largest planet",
        "target_old": "Jupiter",
        "rephrases": ["In our solar system, the biggest planet is"],
        "locality": [{"prompt": "The closest planet to the Sun is", "answer": "Mercury"},
                     {"prompt": "The capital of Japan is", "answer": "Tokyo"}],
    },
    {
        "prompt": "The author of Romeo and Juliet is",
        "target_new": "Charles Dickens",
        "subject": "Romeo and Juliet",
        "target_old": "William Shakespeare",
        "rephrases": ["Romeo and Juliet was written by"],
        "locality": [{"prompt": "The author of Pride and Prejudice is", "answer": "Jane Austen"},
                     {"prompt": "The chemical symbol for gold is", "answer": "Au"}],
    },
]
