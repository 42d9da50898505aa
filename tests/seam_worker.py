"""train.py with the objective of docs/adding_an_objective.md registered (tests/test_seam.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/seam_worker.py TRAIN_FLAGS...

The doc's code block is executed as written, which registers it in loss.REGULARISERS; then
train.main runs as `python train.py` would. The objective reaches flags, DDP, checkpoints and
resume through the registry alone: train.py is not edited.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DOC = os.path.join(ROOT, "docs", "adding_an_objective.md")


def doc_example() -> str:
    """The doc's first python code block."""
    with open(DOC) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)[0]


def register_doc_example() -> type:
    """Execute the doc's example (which registers it) and return its regulariser class."""
    namespace = {"__name__": "doc_example"}
    exec(compile(doc_example(), DOC, "exec"), namespace)
    return namespace["SelfAlign"]


if __name__ == "__main__":
    import train  # noqa: E402

    register_doc_example()
    train.main(train.get_args())
