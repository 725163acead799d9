"""Names are single path components, and nothing outside the catalog root is ever read: not through
a name, not through a symlinked adapter, config or weight file, not through a swap after the scan."""

import os
import shutil

import pytest

from loraplex.catalog import Catalog, MemoryCatalog
from loraplex.catalog.names import check_name
from loraplex.errors import AdapterChanged, InvalidAdapterName

from .helpers import inotify_opens, python_opens

BAD_NAMES = [
    ("..", "'.' and '..' are not adapter names"),
    (".", "'.' and '..' are not adapter names"),
    ("../alpha-r4", "hidden names (starting with '.') are not adapters"),
    ("a/../../etc", "names are a single path component (no '/' or '\\')"),
    ("/etc/passwd", "names are a single path component (no '/' or '\\')"),
    ("alpha-r4/", "names are a single path component (no '/' or '\\')"),
    ("..\\x", "hidden names (starting with '.') are not adapters"),
    ("a\\b", "names are a single path component (no '/' or '\\')"),
    (".hidden", "hidden names (starting with '.') are not adapters"),
    ("", "empty name"),
    ("s3:bucket", "':' is not allowed (it could be read as a URL scheme)"),
    ("a\x00b", "control characters are not allowed"),
    ("a\nb", "control characters are not allowed"),
    ("x" * 256, "longer than 255 bytes"),
    (b"alpha-r4", "names are strings, got bytes"),
]


@pytest.mark.parametrize("name,reason", BAD_NAMES, ids=[repr(n)[:20] for n, _ in BAD_NAMES])
def test_bad_names_are_refused_before_any_file_access(catalog_dir, name, reason):
    cat = Catalog(catalog_dir)
    for call in (cat.get, cat.get_adapter_id, cat.load_tensors, cat.local_path):
        with python_opens() as opened, pytest.raises(InvalidAdapterName) as ei:
            call(name)
        assert ei.value.reason == reason and ei.value.name == name
        assert str(ei.value) == f"invalid LoRA adapter name {name!r}: {reason}"
        assert opened == []
    with pytest.raises(InvalidAdapterName):
        MemoryCatalog().register(name, catalog_dir / "alpha-r4")


def test_good_names():
    for name in ("alpha-r4", "my adapter (v2)", "日本語-lora", "a.b", "a..b", "x" * 255):
        assert check_name(name) == name


@pytest.fixture
def outside(tmp_path, adapter_source):
    """A valid adapter outside the catalog root: a symlink must never make it readable."""
    d = tmp_path / "outside"
    d.mkdir()
    shutil.copytree(adapter_source / "alpha-r4", d / "secret")
    return d


def test_symlinked_adapter_dir_that_leaves_the_root(catalog_dir, outside):
    os.symlink(outside / "secret", catalog_dir / "escape")
    os.symlink("../outside/secret", catalog_dir / "escape-relative")
    os.symlink("../outside/nothing", catalog_dir / "dangling")
    with inotify_opens(outside) as kernel, python_opens() as py:
        cat = Catalog(catalog_dir)
        with pytest.raises(Exception, match="is invalid: symlink .* points outside the catalog root"):
            cat.load_tensors("escape")
    assert "escape" not in cat and "escape-relative" not in cat
    assert cat.invalid() == {
        "escape": f"symlink {catalog_dir / 'escape'} points outside the catalog root",
        "escape-relative": f"symlink {catalog_dir / 'escape-relative'} points outside the catalog root",
        "dangling": "is a broken symlink",
    }
    assert kernel == [] and not [p for p in py if os.path.realpath(p).startswith(str(outside))]


@pytest.mark.parametrize("which", ["adapter_config.json", "adapter_model.safetensors"])
def test_symlinked_file_that_leaves_the_root(catalog_dir, outside, which):
    os.remove(catalog_dir / "beta-r8" / which)
    os.symlink(outside / "secret" / which, catalog_dir / "beta-r8" / which)
    with inotify_opens(outside) as kernel:
        cat = Catalog(catalog_dir)
    assert cat.invalid() == {"beta-r8": f"{which} is a symlink that leaves the catalog root"}
    assert kernel == []


def test_symlinks_inside_the_root_are_fine(catalog_dir, adapter_source):
    # an alias directory and a file shared between adapters: both stay inside the root
    os.symlink("alpha-r4", catalog_dir / "alpha-latest")
    os.remove(catalog_dir / "gamma-r16" / "adapter_config.json")
    os.symlink("../gamma-r16-config.json", catalog_dir / "gamma-r16" / "adapter_config.json")
    shutil.copy(adapter_source / "gamma-r16" / "adapter_config.json", catalog_dir / "gamma-r16-config.json")
    cat = Catalog(catalog_dir)
    assert cat.invalid() == {}
    assert cat.get("alpha-latest").r == 4 and cat.get("gamma-r16").r == 16
    assert cat.load_tensors("alpha-latest").keys() == cat.load_tensors("alpha-r4").keys()


def test_weights_swapped_for_an_escaping_symlink_after_the_scan(catalog_dir, outside):
    cat = Catalog(catalog_dir)
    held = cat.get("alpha-r4")
    w = catalog_dir / "alpha-r4" / "adapter_model.safetensors"
    os.remove(w)
    os.symlink(outside / "secret" / "adapter_model.safetensors", w)
    with inotify_opens(outside) as kernel:
        with pytest.raises(AdapterChanged) as ei:
            cat.load_adapter("alpha-r4", held)
        assert ei.value.new_version is None  # the adapter as it is now is not servable
        cat.refresh()
    assert kernel == []  # the outside file was never opened
    assert cat.invalid() == {"alpha-r4": "adapter_model.safetensors is a symlink that leaves the catalog root"}


def test_every_read_stays_inside_the_root(catalog_dir, tmp_path):
    # The whole life of a catalog (scan, refresh, loading every adapter): every path opened, by
    # Python or natively, resolves inside the root.
    root_real = os.path.realpath(catalog_dir)
    with inotify_opens(tmp_path) as kernel, python_opens() as py:
        cat = Catalog(catalog_dir)
        cat.refresh()
        for n in cat.names():
            cat.load_tensors(n)
    touched = [p for p in kernel + py if os.path.realpath(p).startswith(str(tmp_path))]
    assert touched and all(os.path.realpath(p).startswith(root_real + os.sep) for p in touched), touched
