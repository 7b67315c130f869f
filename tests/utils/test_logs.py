"""monai_dp's messages reach a user who sets up logging with ``logging.basicConfig`` (Opacus' root handler removed)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

from monai_dp.utils import logs

# A fresh interpreter: a user script that calls basicConfig after importing monai_dp, trains until the
# budget stops it, then resumes a checkpoint with max_epochs already reached.
USER_SCRIPT = textwrap.dedent("""
    import logging, sys
    if sys.argv[1] == "before":
        logging.basicConfig(level=logging.INFO, format="USER %(levelname)s %(name)s: %(message)s")
    import torch
    from monai.data import DataLoader
    from monai.handlers import CheckpointLoader
    from monai_dp.engines import DPSupervisedTrainer
    if sys.argv[1] == "after":
        logging.basicConfig(level=logging.INFO, format="USER %(levelname)s %(name)s: %(message)s")

    def trainer(max_epochs, target_epsilon):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        data = [{"image": torch.randn(4), "label": torch.tensor(i % 2)} for i in range(16)]
        return DPSupervisedTrainer(
            device="cpu", max_epochs=max_epochs, train_data_loader=DataLoader(data, batch_size=8), network=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=torch.nn.CrossEntropyLoss(),
            noise_multiplier=1.0, target_epsilon=target_epsilon, target_delta=1e-3, accountant="rdp",
            grad_sample_mode="per_sample", progress_interval=None)

    trainer(max_epochs=30, target_epsilon=4.0).run()  # stopped by the budget
    first = trainer(max_epochs=1, target_epsilon=50.0)
    first.run()
    torch.save({"trainer": first.state_dict()}, sys.argv[2])
    again = trainer(max_epochs=1, target_epsilon=50.0)
    CheckpointLoader(load_path=sys.argv[2], load_dict={"trainer": again}).attach(again)
    again.run()
""")


def test_messages_reach_a_basic_config_set_up_after_the_import(tmp_path):
    done = subprocess.run([sys.executable, "-c", USER_SCRIPT, "after", str(tmp_path / "ckpt.pt")], capture_output=True,
                          text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    user_lines = [line for line in done.stderr.splitlines() if line.startswith("USER ")]
    for expected in ("USER INFO monai_dp.engines.trainer: make_private_compatible: 1 x BatchNorm1d -> GroupNorm",
                     "DPSupervisedTrainer: DP-SGD (record level): σ = 1",
                     "DPSupervisedTrainer: Privacy budget reached: ε =",
                     "DPSupervisedTrainer: No DP step taken in this run: the trainer is already at epoch"):
        assert any(expected in line for line in user_lines), (expected, done.stderr[-3000:])
    assert not any(":INFO:" in line for line in done.stderr.splitlines())  # nothing in Opacus' root format


def test_only_the_handler_opacus_added_is_removed():
    root = logging.getLogger()
    mine = logging.StreamHandler()
    opacus_like = logging.StreamHandler()
    opacus_like.setFormatter(logging.Formatter(logs.OPACUS_FORMAT, logs.OPACUS_DATEFMT))
    same_format_other_class = logging.FileHandler(__file__, delay=True)
    same_format_other_class.setFormatter(logging.Formatter(logs.OPACUS_FORMAT, logs.OPACUS_DATEFMT))
    for handler in (mine, opacus_like, same_format_other_class):
        root.addHandler(handler)
    try:
        assert logs.remove_opacus_root_handler() == 1
        assert mine in root.handlers and same_format_other_class in root.handlers
        assert opacus_like not in root.handlers
    finally:
        for handler in (mine, opacus_like, same_format_other_class):
            root.removeHandler(handler)


def test_the_import_hook_keeps_the_handlers_there_before_and_removes_those_the_module_added():
    """basicConfig before the import (the user's handler is there first): Opacus' module adds nothing and the user's
    handler stays; a module that adds a root handler while it runs has it removed."""
    root = logging.getLogger()
    users = logging.StreamHandler()
    added = logging.StreamHandler()

    class Inner:
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            root.addHandler(added)

        def get_source(self, name):
            return "source of " + name

    root.addHandler(users)
    try:
        loader = logs._RootHandlersUndone(Inner())
        loader.exec_module(object())
        assert users in root.handlers and added not in root.handlers
        assert loader.get_source("m") == "source of m"  # the real loader's other methods still answer
    finally:
        root.removeHandler(users)
        root.removeHandler(added)


def test_the_hook_is_installed_once_and_only_while_opacus_is_not_imported(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, logs._OpacusImportHook)])
    monkeypatch.delitem(sys.modules, logs.OPACUS_MODULE, raising=False)
    logs.guard_opacus_logging()
    logs.guard_opacus_logging()
    assert sum(isinstance(f, logs._OpacusImportHook) for f in sys.meta_path) == 1
    assert isinstance(sys.meta_path[0], logs._OpacusImportHook)
    assert sys.meta_path[0].find_spec("opacus.other", None) is None
