"""Command line: `loraplex catalog ls|validate ROOT`, `loraplex demo [...]` (loraplex.demo) and
`loraplex serve MODEL --lora-catalog-type storage --lora-catalog-path PATH [vLLM args]`.

`catalog ls` reads adapter_config.json files and the header of each weight file (the catalog's cheap
weights check; torch is not imported); `catalog validate` also reads every adapter's weights, unless
--quick, with a progress bar on stderr when it is a terminal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys

from . import __version__

EXIT_OK, EXIT_INVALID, EXIT_UNUSABLE = 0, 1, 2


def _open(args, **kwargs):
    """The catalog at args.root, or None after printing why it cannot be used."""
    from .catalog import Catalog
    from .errors import CatalogError

    try:
        return Catalog(args.root, cache_dir=getattr(args, "cache_dir", None), **kwargs)
    except CatalogError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # unreachable


def _short_version(v: str) -> str:
    # The version is long (inodes, mtimes, sizes or ETags); a short digest still shows a change.
    return hashlib.blake2b(v.encode(), digest_size=6).hexdigest()


def _targets(spec) -> str:
    t = spec.target_modules
    return t if isinstance(t, str) else ",".join(sorted(t))


def _alpha(a: float) -> str:
    return str(int(a)) if float(a).is_integer() else f"{a:g}"


def table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Rows aligned under the header; columns in `right` right-aligned (numbers)."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def cmd_ls(args) -> int:
    cat = _open(args)
    if cat is None:
        return EXIT_UNUSABLE
    cat.wait_checks()  # list what a server would list once its weights checks are done
    entries, unchecked = cat.entries(), cat.unchecked()
    if args.json:
        out = [{"name": e.name, "id": e.id, "rank": e.r, "max_rank": e.max_rank, "lora_alpha": e.lora_alpha,
                "scaling": e.scaling, "use_rslora": e.use_rslora, "target_modules": e.target_modules,
                "rank_pattern": dict(e.rank_pattern), "alpha_pattern": dict(e.alpha_pattern),
                "base_model_name_or_path": e.base_model_name_or_path, "weight_format": e.weight_format,
                "size_bytes": e.size_bytes, "version": e.version, "path": e.path} for e in entries]
        json.dump({"root": cat.root, "adapters": out, "invalid": cat.invalid(), "unchecked": unchecked}, sys.stdout,
                  indent=2)
        print()
        return EXIT_OK
    rows = [[e.name, str(e.id), str(e.r) if e.max_rank == e.r else f"{e.r} (max {e.max_rank})", _alpha(e.lora_alpha),
             _targets(e.spec), _size(e.size_bytes), _short_version(e.version)] for e in entries]
    print(table(["name", "id", "rank", "alpha", "targets", "size", "version"], rows, right={1, 2, 3, 5}))
    bad = len(cat.invalid())
    print(f"\n{len(entries)} adapters in {cat.root}"
          + (f"; {len(unchecked)} with weights not checked yet (remote, not downloaded)" if unchecked else "")
          + (f"; {bad} invalid (see `loraplex catalog validate`)" if bad else ""))
    return EXIT_OK


def _progress(items: list[str], what: str):
    """`items` with a progress bar on stderr when stderr is a terminal; as they are when piped or logged
    (a remote catalog can take minutes: every weight file is downloaded and read)."""
    from tqdm import tqdm

    return tqdm(items, desc=what, unit="adapter", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)


def cmd_validate(args) -> int:
    # Invalid adapters are reported below, each once: silence the catalog's own scan warnings.
    logging.getLogger("loraplex.catalog").setLevel(logging.ERROR)
    cat = _open(args, sync_checks=sys.maxsize)  # every weights check before it returns (remote: ranged reads)
    if cat is None:
        return EXIT_UNUSABLE
    from .errors import AdapterChanged, CatalogError

    invalid = dict(cat.invalid())
    checked = 0
    if not args.quick:  # the weights too: header, names, shapes against the rank, finite values
        for name in _progress(cat.names(), "reading weights"):
            try:
                cat.load_tensors(name)
                checked += 1
            except AdapterChanged as e:
                invalid[name] = f"changed while it was validated ({e}); run again"
            except CatalogError as e:
                invalid[name] = getattr(e, "reason", None) or str(e)
    for name in sorted(invalid):
        print(f"INVALID  {name}: {invalid[name]}")
    if args.quick:
        for name in cat.unchecked():
            print(f"UNCHECKED  {name}: weights not checked (a remote .bin, or storage did not answer)")
    what = "configs and weight headers (--quick)" if args.quick else f"{checked} with weights read"
    print(f"{len(cat.names()) + len(cat.invalid()) - len(invalid)} valid, {len(invalid)} invalid in {cat.root} "
          f"({what})")
    return EXIT_INVALID if invalid else EXIT_OK


def cmd_demo(args) -> int:
    """The end-to-end demo (loraplex.demo): its own options, passed through."""
    from . import demo

    return demo.main(args.demo_args)


def cmd_serve(args) -> int:
    from .vllm_plugin.serve import serve_main

    return serve_main(args.serve_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex", description="Serve thousands of LoRA adapters over one base model.")
    p.add_argument("--version", action="version", version=f"loraplex {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    cat = sub.add_parser("catalog", help="list or validate the adapters of a catalog root")
    csub = cat.add_subparsers(dest="catalog_command", required=True)
    ls = csub.add_parser("ls", help="table of the servable adapters (reads configs, never weights)")
    ls.add_argument("--json", action="store_true", help="machine-readable output with full versions")
    ls.set_defaults(func=cmd_ls)
    va = csub.add_parser("validate", help="every invalid adapter with its reason; exit 1 if any, 2 if the "
                                          "root is unusable")
    va.add_argument("--quick", action="store_true", help="check configs and weight headers only (no tensor data read)")
    va.set_defaults(func=cmd_validate)
    for sp in (ls, va):
        sp.add_argument("root", help="catalog directory or URL (s3://bucket/prefix, ...)")
        sp.add_argument("--cache-dir", default=None, help="local cache for a remote catalog")
    demo = sub.add_parser("demo", add_help=False, help="serve a mixed-adapter workload over a tiny model and "
                                                       "check it against transformers + PEFT (see --help)")
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=cmd_demo)
    serve = sub.add_parser("serve", add_help=False, help="vLLM's OpenAI server with the loraplex plugin: "
                                                         "MODEL --lora-catalog-type storage --lora-catalog-path P")
    serve.add_argument("serve_args", nargs=argparse.REMAINDER)
    serve.set_defaults(func=cmd_serve)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # everything after it is the demo's (argparse would claim --help)
        return cmd_demo(argparse.Namespace(demo_args=argv[1:]))
    if argv[:1] == ["serve"]:  # everything after it is vLLM's, less our two catalog flags
        return cmd_serve(argparse.Namespace(serve_args=argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
