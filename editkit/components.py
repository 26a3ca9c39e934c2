"""Base classes for what plugins provide: editors (take edit requests) and interventions
(change how the model uses knowledge). Both attach to a loaded model, detach leaving it
bit-identical, and save/load their state as tensors plus JSON (never pickle)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from editkit.chunks import StateChanges
from editkit.errors import InvalidRequest
from editkit.model import LoadedModel
from editkit.schemas import EditRequest


class NoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


def describe_validation_error(exc: ValidationError, what: str) -> str:
    """One line naming each bad field and why."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{field}: {err['msg'].removeprefix('Value error, ')}")
    return f"invalid {what}: " + "; ".join(parts)


class Component:
    """Shared contract of editors and interventions."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = NoConfig
    description: ClassVar[str] = ""
    # True: the component records in self.changes what it changes in its state, so a save
    # writes and hashes only that (see editkit.chunks.StateChanges). False: every save
    # reads its whole state (correct for any component; the cost grows with the state).
    tracks_changes: ClassVar[bool] = False
    # True: a hook decides what it does to a sequence from all of its tokens (WISE routes a
    # sequence by its mean activation), so a position's output depends on later tokens and a
    # teacher-forced pass over prompt + target is not what greedy decoding from the prompt
    # computes; scoring then decodes exact match for real (editkit.scoring.greedy_generations).
    reads_whole_input: ClassVar[bool] = False
    # Why folded_weights() refuses (what a plain checkpoint would lose), for components that do.
    export_refusal: ClassVar[str] = "it changes the model's behaviour through hooks at inference, which a " \
                                    "checkpoint does not carry"

    def __init__(self, loaded: LoadedModel, config: BaseModel | dict | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.adapter = loaded.adapter
        self.config = self.make_config(config)
        self.attached = False
        self.changes = StateChanges()

    @classmethod
    def make_config(cls, values: BaseModel | dict | None) -> BaseModel:
        if isinstance(values, cls.Config):
            return values
        try:
            return cls.Config.model_validate(dict(values or {}))
        except ValidationError as exc:
            raise InvalidRequest(describe_validation_error(exc, f"{cls.name} config")) from None

    def attach(self) -> None:
        """Install hooks / modules on the model. Called once, before any edit or state load."""
        raise NotImplementedError

    def detach(self) -> None:
        """Remove everything attach() and later edits installed; the model is as before attach().
        The default removes the hooks registered with hook(); extend it for anything else."""
        self.remove_hooks()
        self.attached = False

    def hook(self, module: torch.nn.Module, fn, *, pre: bool = False, with_kwargs: bool = False):
        """Register a forward hook (`pre`: a forward pre-hook) on `module` that detach()
        removes; returns its handle."""
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        handle = register(fn, with_kwargs=with_kwargs)
        self.__dict__.setdefault("_handles", []).append(handle)
        if self.reads_whole_input:
            self.loaded.whole_input_readers.add(id(self))
        return handle

    def remove_hooks(self) -> None:
        """Remove every hook registered with hook()."""
        for handle in self.__dict__.get("_handles", []):
            handle.remove()
        self._handles = []
        self.loaded.whole_input_readers.discard(id(self))

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-serialisable metadata) describing everything learned so far. The
        tensors may be the live state itself (WISE's memories, NMC's slots are written in
        place): copy them to keep them past the next edit."""
        raise NotImplementedError

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore a state from state_dict(). Must validate shapes before changing anything."""
        raise NotImplementedError

    def folded_weights(self) -> dict[str, torch.Tensor]:
        """For `editkit export`: the model parameters this component changes (named as in
        model.named_parameters()), with its effect folded in, so a plain checkpoint behaves
        as the edited model does. A component whose effect is not a change of weights (it
        routes, looks up, or keeps memory at inference) raises InvalidRequest naming what
        would be lost; that is the default."""
        raise InvalidRequest(f"{self.name} cannot be exported as plain weights: {self.export_refusal}")

    # Components with runtime memory per conversation (e.g. memory reweaving) override these;
    # for the rest a conversation changes nothing.
    def conversation(self, conversation: str) -> AbstractContextManager:
        """Forward passes inside the block read and write `conversation`'s runtime memory."""
        return nullcontext()

    def clear_conversation(self, conversation: str) -> None:
        """Forget what `conversation` left in runtime memory."""

    def chunk_tokens(self) -> int | None:
        """Inside a conversation, inputs longer than this many tokens are read chunk by chunk
        (each earlier chunk one forward pass into the runtime memory, the last chunk the
        prompt generation continues); None: inputs are read whole."""
        return None


class Editor(Component):
    """An editing method. The session seeds torch's RNG before each apply() so replays are exact."""

    # True: Session.edit([...]) hands all the requests of one call to apply_turn together
    # (a turn); rolling one back solves its turn again without it. False: apply() each.
    edits_in_turns: ClassVar[bool] = False

    def apply(self, request: EditRequest) -> dict[str, float]:
        """Make the model follow `request`; return training statistics (loss, steps...)."""
        raise NotImplementedError

    def apply_turn(self, requests: list[EditRequest]) -> list[dict[str, float]]:
        """Apply a turn of requests together; one statistics dict per request, in order.
        Default: apply() each in order."""
        return [dict(self.apply(r)) for r in requests]


class Intervention(Component):
    """Changes how the model uses what it knows (e.g. head pruning, memory reweaving)."""

    @classmethod
    def state_from_file(cls, path, options: dict[str, Any], loaded: LoadedModel
                        ) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor], dict[str, Any]]:
        """What `editkit intervention add NAME --from FILE` attaches: (config, tensors, meta)
        read from a file this intervention's own commands wrote (a calibration, a training),
        with the user's --config values in `options`. Check the file against `loaded` (its
        fingerprint) and raise InvalidRequest / WorkspaceError with a reason. The default
        takes no file: such an intervention is added from --config alone."""
        raise InvalidRequest(f"intervention '{cls.name}' is not added from a file; give its --config only")
