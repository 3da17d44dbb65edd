import subprocess
import sys

from pagedserve.utils import cdiv

_FREEZE = """
import gc
from pagedserve.utils import freeze_gc_heap

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a

cycle()  # garbage before the freeze: collected by it, not frozen
freeze_gc_heap()
frozen = gc.get_freeze_count()
assert frozen > 1000, frozen  # the interpreter's own start-up heap at least
assert gc.collect() == 0  # nothing left to walk but what came after
cycle()
assert gc.collect() >= 2  # a cycle made after the freeze is still found
assert gc.get_freeze_count() == frozen
print("ok")
"""


def test_cdiv_rounds_up() -> None:
    assert [cdiv(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_freeze_gc_heap_takes_the_startup_heap_out_of_collections() -> None:
    # In a fresh interpreter: a freeze inside the test process would keep the suite's garbage.
    result = subprocess.run([sys.executable, "-c", _FREEZE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
