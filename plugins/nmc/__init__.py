"""Neural memory controller with synthetic gradients ("Fast & Slow Learning: Incorporating
Synthetic Gradients in Neural Memory Controllers", arXiv 2011.05438; synthetic gradients as in
Jaderberg et al. 2017): a key-value memory at one block output, written by a controller (slot,
erase, write) whose writes take fast synthetic-gradient steps and slow true-gradient steps that
also train the synthetic-gradient module. See editor.py for the mechanism.

Python API: NMCEditor, NMCConfig, SyntheticGradient, save_feedback / load_feedback, pretrain,
evaluate_feedback; the learned controller: ControllerNet, train_controller, save_controller /
load_controller. CLI: `editkit nmc pretrain | evaluate | train-controller`."""

from editkit.hookspecs import hookimpl

from .config import NMCConfig
from .control_train import train_controller
from .controller import ControllerNet, load_controller, save_controller
from .editor import NMCEditor
from .feedback import SyntheticGradient, load_feedback, save_feedback
from .pretrain import evaluate_feedback, pretrain

__all__ = ["ControllerNet", "NMCConfig", "NMCEditor", "SyntheticGradient", "evaluate_feedback", "load_controller",
           "load_feedback", "pretrain", "save_controller", "save_feedback", "train_controller"]


@hookimpl
def register_editors(register):
    register(NMCEditor)


@hookimpl
def register_commands(register):
    from .commands import make_app

    register("nmc", make_app())
