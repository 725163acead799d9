"""The plugin without an engine: enabling, version check, idempotence, the catalog resolver, the
`loraplex serve` command line, the post-import hook."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from loraplex.errors import ConfigError

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_sources]  # no engine: also run on 0.33's sources


@pytest.fixture
def clean_plugin(monkeypatch):
    from loraplex import vllm_plugin

    for var in ("LORAPLEX_CATALOG", "LORAPLEX_ENABLE", "LORAPLEX_KERNELS"):
        monkeypatch.delenv(var, raising=False)
    vllm_plugin.unregister()
    yield monkeypatch
    vllm_plugin.unregister()


# ---- enabling and the version check --------------------------------------------------------------
def test_import_does_not_import_vllm():
    code = "import sys, loraplex, loraplex.vllm_plugin; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_wanted_parts():
    from loraplex.vllm_plugin.plugin import wanted_parts

    assert wanted_parts({}) == set()
    assert wanted_parts({"LORAPLEX_ENABLE": "1"}) == {"kernels"}
    assert wanted_parts({"LORAPLEX_ENABLE": "0"}) == set()
    everything = {"kernels", "resolver", "serving", "worker_manager", "engine_core"}
    assert wanted_parts({"LORAPLEX_CATALOG": "/x"}) == everything
    assert wanted_parts({"LORAPLEX_CATALOG": "/x", "LORAPLEX_KERNELS": "0"}) == everything - {"kernels"}
    # the ledger needs the engine core's announcements whether or not queued adapters load ahead
    assert wanted_parts({"LORAPLEX_CATALOG": "/x", "LORAPLEX_QUEUE_PREFETCH": "0"}) == everything


@pytest.mark.parametrize("version, ok", [("0.32.0", True), ("0.33.1", True), ("0.32.0+cpu", True),
                                         ("0.33.0rc2", True), ("0.31.2", False), ("0.34.0", False),
                                         ("1.0.0", False), ("dev", False)])
def test_version_check(version, ok):
    from loraplex.vllm_plugin.version import UnsupportedVllmVersion, check_vllm_version

    if ok:
        assert check_vllm_version(version) in ((0, 32), (0, 33))
    else:
        with pytest.raises(UnsupportedVllmVersion, match=r"supports vLLM 0\.32\.x, 0\.33\.x"):
            check_vllm_version(version)


def test_installed_vllm_is_supported():
    from loraplex.vllm_plugin.version import check_vllm_version

    check_vllm_version()


def test_register_is_a_noop_when_disabled(clean_plugin):
    from vllm.platforms import current_platform

    from loraplex import vllm_plugin

    before = current_platform.get_punica_wrapper()
    assert vllm_plugin.register() == frozenset()
    assert current_platform.get_punica_wrapper() == before
    assert "PunicaWrapper" in before and "loraplex" not in before


def test_register_fails_clearly_on_unsupported_vllm(clean_plugin):
    import vllm

    from loraplex import vllm_plugin
    from loraplex.vllm_plugin.version import UnsupportedVllmVersion

    clean_plugin.setenv("LORAPLEX_ENABLE", "1")
    clean_plugin.setattr(vllm, "__version__", "0.40.0")
    with pytest.raises(UnsupportedVllmVersion, match="0.40.0"):
        vllm_plugin.register()


def test_register_kernels_idempotent_and_reversible(clean_plugin):
    from vllm.lora.punica_wrapper import get_punica_wrapper
    from vllm.platforms import current_platform

    from loraplex import vllm_plugin
    from loraplex.vllm_plugin.plugin import _platform_originals
    from loraplex.vllm_plugin.punica import QUALNAME, LoraplexPunicaWrapper

    before = current_platform.get_punica_wrapper()
    clean_plugin.setenv("LORAPLEX_ENABLE", "1")
    assert vllm_plugin.register() == {"kernels"}
    n_patched = len(_platform_originals)
    assert vllm_plugin.register() == {"kernels"}  # second call (another plugin load): nothing new
    assert len(_platform_originals) == n_patched
    assert current_platform.get_punica_wrapper() == QUALNAME
    from vllm.config.lora import LoRAConfig

    wrapper = get_punica_wrapper(64, max_batches=4, device="cpu", lora_config=LoRAConfig(max_loras=2))
    assert isinstance(wrapper, LoraplexPunicaWrapper)
    vllm_plugin.unregister()
    assert current_platform.get_punica_wrapper() == before


# ---- the catalog resolver ------------------------------------------------------------------------
@pytest.fixture
def resolver(catalog_dir):
    from loraplex.vllm_plugin.catalog_handle import CatalogHandle
    from loraplex.vllm_plugin.resolver import CatalogLoRAResolver

    return CatalogLoRAResolver(CatalogHandle(str(catalog_dir), min_refresh_interval=0.0))


def _resolve(resolver, name):
    return asyncio.run(resolver.resolve_lora("base", name))


def test_resolver_known_names(resolver, catalog_dir):
    from loraplex.catalog import Catalog
    from loraplex.vllm_plugin.identity import split_path, version_id, version_token

    catalog = Catalog(catalog_dir)
    for name in ("alpha-r4", "beta-r8", "gamma-r16"):
        req = _resolve(resolver, name)
        assert req.lora_name == name
        path, token = split_path(req.lora_path)
        assert os.path.isabs(path) and os.path.samefile(path, catalog_dir / name)
        assert token == version_token(catalog.get(name).version)  # the version travels with the request
        # one id per version, deterministic (any process agrees), in the int32 range vLLM 0.33 keeps ids in
        assert req.lora_int_id == version_id(name, token) and 0 < req.lora_int_id < 2**31 - 1
        assert not req.load_inplace


@pytest.mark.parametrize("name", ["missing", "../alpha-r4", "..", ".", "a/b", "alpha-r4/..", ".hidden", "",
                                  "x:y", "alpha-r4\x00", "/etc/passwd"])
def test_resolver_refuses_unknown_and_unsafe_names(resolver, name):
    assert _resolve(resolver, name) is None


def test_resolver_sees_adapters_added_later(resolver, catalog_dir):
    assert _resolve(resolver, "delta") is None
    shutil.copytree(catalog_dir / "alpha-r4", catalog_dir / "delta")
    req = _resolve(resolver, "delta")
    assert req is not None and os.path.samefile(req.lora_path.split("#")[0], catalog_dir / "delta")


def test_resolver_refuses_invalid_adapters(resolver, catalog_dir):
    bad = catalog_dir / "broken"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    assert _resolve(resolver, "broken") is None


def test_resolver_gives_each_version_its_own_path(resolver, catalog_dir):
    """vLLM keys prefix-cache blocks by (name, path) and slots by id: a new version shares neither with the
    old one, so both can be resident (and in one batch) at once."""
    first = _resolve(resolver, "alpha-r4")
    assert _resolve(resolver, "alpha-r4").lora_path == first.lora_path  # unchanged: same keys, cache hits
    weights = catalog_dir / "alpha-r4" / "adapter_model.safetensors"
    data = weights.read_bytes()
    os.utime(weights, ns=(os.stat(weights).st_atime_ns, os.stat(weights).st_mtime_ns + 10**9))
    weights.write_bytes(data)
    again = _resolve(resolver, "alpha-r4")  # no refresh needed: a known local adapter is re-stat'ed
    assert again.lora_int_id != first.lora_int_id and again.lora_path != first.lora_path
    assert not again.load_inplace


def test_resolver_refuses_nan_weights_with_the_reason(resolver, catalog_dir):
    from safetensors.torch import load_file, save_file

    from loraplex.errors import InvalidAdapter

    weights = catalog_dir / "beta-r8" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key].view(-1)[3] = float("inf")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(InvalidAdapter, match=r"'beta-r8'.*NaN or infinite"):
        resolver.resolve_checked("beta-r8")
    assert _resolve(resolver, "beta-r8") is None
    assert "beta-r8" not in resolver.handle.names() and "alpha-r4" in resolver.handle.names()


def test_register_installs_the_resolver(clean_plugin, catalog_dir):
    from vllm.lora.resolver import LoRAResolverRegistry

    from loraplex import vllm_plugin

    clean_plugin.setenv("LORAPLEX_CATALOG", str(catalog_dir))
    clean_plugin.setenv("LORAPLEX_KERNELS", "0")
    assert vllm_plugin.register() == {"resolver", "serving", "worker_manager", "engine_core"}
    resolver = LoRAResolverRegistry.get_resolver("loraplex")
    assert _resolve(resolver, "beta-r8").lora_name == "beta-r8"
    req = vllm_plugin.lora_request("gamma-r16")
    assert os.path.samefile(req.lora_path.split("#")[0], catalog_dir / "gamma-r16")
    with pytest.raises(KeyError):
        vllm_plugin.lora_request("nope")
    with pytest.raises(ValueError):
        vllm_plugin.lora_request("../gamma-r16")
    vllm_plugin.unregister()
    assert "loraplex" not in LoRAResolverRegistry.get_supported_resolvers()


# ---- loraplex serve ------------------------------------------------------------------------------
def test_serve_command_storage(tmp_path):
    from loraplex.vllm_plugin.serve import build_command

    args, env, removed, config = build_command(
        ["serve", "my/model", "--lora-catalog-type", "storage", "--lora-catalog-path", str(tmp_path),
         "--port", "8001", "--max-loras", "4"], environ={})
    assert args == ["serve", "my/model", "--port", "8001", "--max-loras", "4", "--enable-lora"]
    assert env == {"LORAPLEX_CATALOG": str(tmp_path), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    assert config.catalog_type == "storage" and removed == []
    args, env, _, _ = build_command(["m", "--enable-lora", "--lora-catalog-type=storage",
                                     "--lora-catalog-path=s3://bucket/loras"], environ={})
    assert args.count("--enable-lora") == 1 and env["LORAPLEX_CATALOG"] == "s3://bucket/loras"


def test_serve_command_memory_is_plain_vllm():
    from loraplex.vllm_plugin.serve import build_command

    args, env, removed, config = build_command(["m", "--max-loras", "2"], environ={})
    assert args == ["serve", "m", "--max-loras", "2"] and env == {} and config.catalog_type == "memory"
    assert removed == ["LORAPLEX_CATALOG"]
    # a catalog exported in the environment selects storage when no flag says otherwise
    _, env, _, config = build_command(["m"], environ={"LORAPLEX_CATALOG": "/data/loras"})
    assert config.catalog_type == "storage" and env["LORAPLEX_CATALOG"] == "/data/loras"


@pytest.mark.parametrize("argv, message", [
    (["m", "--lora-catalog-type", "storage"], "needs catalog_path"),
    (["m", "--lora-catalog-type", "memory", "--lora-catalog-path", "/x"], "mutually exclusive"),
])
def test_serve_command_errors(argv, message):
    from loraplex.vllm_plugin.serve import build_command

    with pytest.raises(ConfigError, match=message):
        build_command(argv, environ={})


def test_serve_main_exits_2_with_a_message(tmp_path, capsys):
    from loraplex.vllm_plugin.serve import serve_main

    assert serve_main(["m", "--lora-catalog-type", "storage"]) == 2
    assert "needs catalog_path" in capsys.readouterr().err
    assert serve_main(["m", "--lora-catalog-type", "storage", "--lora-catalog-path", str(tmp_path / "no")]) == 2
    assert "cannot open the adapter catalog" in capsys.readouterr().err


# ---- the post-import hook ------------------------------------------------------------------------
def test_after_import_runs_after_the_module_loads(tmp_path, monkeypatch):
    from loraplex.vllm_plugin._hooks import after_import

    pkg = tmp_path / "lp_hook_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "late.py").write_text(textwrap.dedent("""
        VALUE = 1
        def value():
            return VALUE
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def patch(module):
        seen.append(module.VALUE)  # the module is fully executed when we run
        module.VALUE = 2

    after_import("lp_hook_pkg.late", patch)
    assert seen == []
    import lp_hook_pkg.late as late

    assert seen == [1] and late.value() == 2
    after_import("lp_hook_pkg.late", patch)  # already imported: runs now
    assert seen == [1, 2]
    for name in ("lp_hook_pkg.late", "lp_hook_pkg"):
        sys.modules.pop(name, None)
