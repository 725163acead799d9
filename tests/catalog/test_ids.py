"""Adapter ids: the documented formula, equal across processes, collisions resolved the same way
whatever order names arrive or leave in."""

import hashlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from loraplex.catalog import Catalog, ids
from loraplex.catalog.ids import IdTable
from loraplex.errors import AdapterNotFound


def reference_id(name: str, k: int = 0) -> int:
    """ids.py's documented formula, written out independently."""
    d = hashlib.blake2b(f"{k}:{name}".encode(), digest_size=8).digest()
    return 1 + int.from_bytes(d, "little") % (2**31 - 2)


@pytest.fixture(scope="module")
def colliding_pair():
    """Two real names whose round-0 ids collide (birthday search, ~65k hashes)."""
    seen = {}
    for i in itertools.count():
        name = f"lora-{i}"
        i0 = reference_id(name)
        if i0 in seen:
            return tuple(sorted((seen[i0], name)))
        seen[i0] = name


def test_ids_follow_the_formula(catalog_dir):
    cat = Catalog(catalog_dir)
    for e in cat.entries():
        assert e.id == reference_id(e.name) and 1 <= e.id <= 2**31 - 2  # positive int32
        assert cat.get_adapter_id(e.name) == e.id and cat.get_adapter_name(e.id) == e.name
    with pytest.raises(AdapterNotFound) as ei:
        cat.get_adapter_name(12345)
    assert str(ei.value) == f"LoRA adapter '#12345' not found in catalog {cat.root}"


_CHILD = """
import json, sys
from loraplex.catalog import Catalog
cat = Catalog(sys.argv[1])
print(json.dumps({e.name: e.id for e in cat.entries()}))
"""


def _ids_in_subprocess(root, hashseed):
    env = dict(os.environ, PYTHONHASHSEED=str(hashseed))  # Python's own str hash differs per process
    out = subprocess.run([sys.executable, "-c", _CHILD, str(root)], capture_output=True, text=True, env=env,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    return json.loads(out.stdout)


def test_ids_equal_across_processes_and_replicas(catalog_dir, adapter_source, colliding_pair, tmp_path):
    for name in colliding_pair:  # include a real collision: its resolution must agree too
        shutil.copytree(adapter_source / "alpha-r4", catalog_dir / name)
    here = {e.name: e.id for e in Catalog(catalog_dir).entries()}
    assert len(set(here.values())) == len(here) == 5
    assert _ids_in_subprocess(catalog_dir, 1) == here == _ids_in_subprocess(catalog_dir, 2)
    # a replica with the same adapters at another path agrees (ids depend on names only)
    replica = tmp_path / "replica"
    shutil.copytree(catalog_dir, replica)
    assert {e.name: e.id for e in Catalog(replica).entries()} == here


def test_collision_resolution(colliding_pair):
    first, second = colliding_pair
    assert reference_id(first) == reference_id(second) and first < second
    for order in ([first, second], [second, first]):
        t = IdTable()
        for n in order:
            t.add([n])
        # the name that sorts first keeps the round-0 id; the other takes its round-1 id
        assert t.by_name == {first: reference_id(first), second: reference_id(second, 1)}
        assert t.by_id == {reference_id(first): first, reference_id(second, 1): second}
    # removing the winner frees the id: the other moves back to round 0, as a fresh replica would give it
    assert t.remove([first]) is True
    assert t.by_name == {second: reference_id(second)}
    fresh = IdTable()
    fresh.assign([second])
    assert fresh.by_name == t.by_name


def test_collision_through_a_catalog(tmp_path, adapter_source, colliding_pair):
    first, second = colliding_pair
    shutil.copytree(adapter_source / "alpha-r4", tmp_path / second)
    cat = Catalog(tmp_path)
    assert cat.get_adapter_id(second) == reference_id(second)
    held = cat.get(second)
    shutil.copytree(adapter_source / "alpha-r4", tmp_path / first)
    cat.refresh()
    # the newcomer sorts first and wins the id: the other is renumbered, its entry rebuilt
    assert cat.get_adapter_id(first) == reference_id(first)
    assert cat.get_adapter_id(second) == reference_id(second, 1) != held.id
    assert cat.get_adapter_name(reference_id(first)) == first
    assert cat.get(second).version == held.version  # same files, same version: only the id moved


def test_incremental_updates_equal_a_fresh_assignment(monkeypatch):
    # A tiny id space forces collisions chains (rounds 1, 2, 3...) on a few dozen names. After every
    # add/remove the table must equal what a fresh replica computes from the same set of names.
    def small_probe(name, k):
        return 1 + reference_id(name, k) % 40

    monkeypatch.setattr(ids, "probe", small_probe)
    rng = random.Random(7)
    deepest = 0
    for _ in range(1500):
        t, names = IdTable(), set()
        for _ in range(8):
            if names and rng.random() < 0.4:
                gone = rng.sample(sorted(names), rng.randint(1, len(names)))
                before = dict(t.by_name)
                moved = t.remove(gone)
                names -= set(gone)
                assert moved == any(t.by_name[n] != before[n] for n in names)
            else:
                new = [f"n{rng.randint(0, 30)}" for _ in range(rng.randint(1, 6))]
                before = dict(t.by_name)
                moved = t.add(new)
                assert moved == any(t.by_name[n] != i for n, i in before.items())
                names |= set(new)
            ref = IdTable()
            ref.assign(sorted(names, reverse=True))
            assert t.by_name == ref.by_name and t.by_id == {i: n for n, i in ref.by_name.items()}
            for n in names:  # the first round whose probe is the name's id: a lower bound of its round
                deepest = max(deepest, next(k for k in itertools.count() if small_probe(n, k) == t.by_name[n]))
    assert deepest >= 2  # the test did exercise multi-round chains
