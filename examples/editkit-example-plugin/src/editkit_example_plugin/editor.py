"""Last-token bias steering: a tiny, real, key-matched editor.

Each edit stores a *key* and a *vector*:

* the key is the residual stream (the output of one decoder block, ``Site("block", layer)``)
  at the last token of the edit's prompt;
* the vector is learned with Adam so that, added to the residual stream at that token, it
  makes the model continue the prompt with the edit's target (cross-entropy on the target
  tokens, teacher forced; later tokens see the change through attention).

At inference the block's output at every token is compared with every key (cosine
similarity); where the best match reaches ``threshold``, that key's vector is added. For a
prompt on its own the token that matches is the input's last token; in ``prompt + target``
(teacher forcing) it is the prompt's last token. Where no key matches, the output is left
untouched, so unrelated inputs run exactly as before.

The decision at a token depends only on the block's output there *before* steering, which
steering at this block cannot change. So a whole sequence in one forward and the same
sequence decoded token by token with a KV cache are steered at exactly the same tokens, and
the editor needs no state besides its keys and vectors.

Only editkit's public contract is used: the adapter resolves the Site to a module, so the
same code runs on every architecture editkit has an adapter for.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from editkit.components import Editor
from editkit.errors import WorkspaceError
from editkit.schemas import EditRequest
from editkit.sites import Site
from editkit.tokens import encode_pair, shifted_loss, teacher_forced_batch

STATE_FORMAT = 1
SAME_KEY = 1.0 - 1e-4  # a new key this close to a stored one is the same prompt edited again


class BiasConfig(BaseModel):
    """Settings of the ``bias`` editor (``--config`` / ``method_config``)."""

    model_config = ConfigDict(extra="forbid")

    layer: int | float = Field(0.5, description="Decoder block whose output is steered: index, negative index, or fraction of depth.")
    threshold: float = Field(0.95, ge=-1.0, le=1.0, description="Cosine similarity to an edit's key at or above which its vector is added. Lower generalises to more paraphrases and disturbs more unrelated prompts.")
    lr: float = Field(0.1, gt=0, description="Adam learning rate.")
    steps: int = Field(40, ge=1, le=10_000, description="Most optimisation steps per edit.")
    early_stop_loss: float = Field(0.05, ge=0, description="Stop once the target loss falls below this.")


class BiasEditor(Editor):
    name = "bias"
    Config = BiasConfig
    description = "Last-token bias steering: a key-matched vector added to one block's output (example plugin)"

    # ---- attach / detach -----------------------------------------------------------------
    def attach(self) -> None:
        self.site = Site("block", self.config.layer)
        self.layer = self.adapter.layer_index(self.config.layer)
        block = self.adapter.module(self.site)
        self.hidden_size = self.adapter.hidden_size
        # Keep the state where the block runs (a device_map may spread blocks over devices).
        param = next(block.parameters(), None)
        self.device = param.device if param is not None else self.loaded.device
        self.keys = torch.zeros((0, self.hidden_size), dtype=torch.float32, device=self.device)
        self.vectors = torch.zeros_like(self.keys)
        self._train: tuple[int, torch.Tensor] | None = None  # (position, vector) while training
        self._capture: list[torch.Tensor] | None = None  # block outputs recorded for a key
        # One forward hook is all this editor installs; detach() removes exactly it.
        self._handle = block.register_forward_hook(self._on_block_output)
        self.attached = True

    def detach(self) -> None:
        if self.attached:
            self._handle.remove()
            self.attached = False

    # ---- the hook ------------------------------------------------------------------------
    def _on_block_output(self, module, inputs, output):
        # Blocks return a tensor or a tuple whose first item is the hidden states.
        hidden = output[0] if isinstance(output, tuple) else output
        steered = self._steer(hidden)
        if steered is None:
            return None  # output left untouched
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    def _steer(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self._capture is not None:  # computing a key: record, change nothing
            self._capture.append(hidden.detach().float())
            return None
        add = self._matched(hidden)
        if self._train is not None:
            # Training: the vector being learned at the prompt's last token; elsewhere the stored
            # edits apply as they will at inference, so the vector is trained in its real context.
            position, vector = self._train
            at = (torch.arange(hidden.shape[1], device=hidden.device) == position)[None, :, None]
            add = torch.where(at, vector.to(hidden.device), 0.0 if add is None else add)
        return None if add is None else hidden + add.to(hidden.dtype)

    def _matched(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Per token, the vector of the best-matching key where it reaches the threshold."""
        if not len(self.keys):
            return None
        keys = F.normalize(self.keys.to(hidden.device), dim=-1)
        sims = F.normalize(hidden.float(), dim=-1) @ keys.T  # (batch, tokens, edits)
        best, slot = sims.max(dim=-1)
        hit = best >= self.config.threshold
        if not bool(hit.any()):
            return None
        return self.vectors.to(hidden.device)[slot] * hit[..., None]

    # ---- editing -------------------------------------------------------------------------
    @torch.no_grad()
    def _key(self, prompt_ids: list[int]) -> torch.Tensor:
        """The block's output at the prompt's last token (before any steering)."""
        self._capture = []
        try:
            ids = torch.tensor([prompt_ids], device=self.loaded.device)
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
            return self._capture[0][0, -1].to(self.device)
        finally:
            self._capture = None

    def apply(self, request: EditRequest) -> dict[str, Any]:
        cfg = self.config
        prompt_ids, _ = encode_pair(self.tokenizer, request.prompt, request.target_new)
        key = self._key(prompt_ids)
        slot = len(self.keys)
        if len(self.keys):
            sims = F.normalize(self.keys, dim=-1) @ F.normalize(key, dim=-1)
            if float(sims.max()) >= SAME_KEY:  # same prompt again: retrain its vector
                slot = int(sims.argmax())
        start_vector = self.vectors[slot] if slot < len(self.keys) else torch.zeros_like(key)
        # Starts at zero (or the stored vector), so no randomness is needed. An editor that draws
        # random numbers must use torch's global RNG: the session seeds it per request.
        vector = start_vector.clone().requires_grad_(True)
        batch = teacher_forced_batch(self.tokenizer, [request.prompt], [request.target_new]).to(self.loaded.device)
        opt = torch.optim.Adam([vector], lr=cfg.lr)
        loss_value, steps = float("nan"), 0
        self._train = (len(prompt_ids) - 1, vector)
        try:
            for steps in range(1, cfg.steps + 1):
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                loss = shifted_loss(logits, batch.labels)
                loss_value = loss.item()
                if loss_value < cfg.early_stop_loss:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            self._train = None
        with torch.no_grad():
            learned = vector.detach()
            if slot < len(self.keys):  # new tensors, never in-place: state_dict() results stay valid
                self.vectors = torch.cat([self.vectors[:slot], learned[None], self.vectors[slot + 1:]])
            else:
                self.keys = torch.cat([self.keys, key[None]])
                self.vectors = torch.cat([self.vectors, learned[None]])
        return {"loss": loss_value, "steps": steps, "slot": slot, "edits": len(self.keys),
                "vector_norm": float(learned.norm())}

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return ({"keys": self.keys, "vectors": self.vectors},
                {"format": STATE_FORMAT, "layer": self.layer, "hidden_size": self.hidden_size})

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        # Check everything first; change nothing unless all of it fits.
        keys, vectors = tensors.get("keys"), tensors.get("vectors")
        problem = None
        if meta.get("format") != STATE_FORMAT:
            problem = f"state format {meta.get('format')!r}, expected {STATE_FORMAT}"
        elif meta.get("layer") != self.layer:
            problem = f"state is for layer {meta.get('layer')!r}, this editor steers layer {self.layer}"
        elif keys is None or vectors is None:
            problem = "state lacks 'keys' or 'vectors'"
        elif keys.dim() != 2 or keys.shape[1] != self.hidden_size or keys.shape != vectors.shape:
            problem = (f"keys {tuple(keys.shape)} / vectors {tuple(vectors.shape)} do not fit hidden size "
                       f"{self.hidden_size}")
        elif not (torch.isfinite(keys).all() and torch.isfinite(vectors).all()):
            problem = "state holds non-finite values"
        if problem:
            raise WorkspaceError(f"bias state does not fit this model/config: {problem}")
        self.keys = keys.to(self.device, torch.float32).clone()
        self.vectors = vectors.to(self.device, torch.float32).clone()
