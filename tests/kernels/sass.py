"""Facts read off a kernel's sm_90 SASS (the text of `cuobjdump -sass`), for the compile test and for
bench/predict.py: what a program can execute before its grid-dependency wait, whether it can exit
without waiting, and how many dependent global round trips it pays before its first data tile.

SASS, not PTX: ptxas moves loads (it sinks a load below a branch when only the code after the branch
uses it), and what the hardware issues is what counts. `griddepcontrol.wait` is ACQBULK in SASS.

Every global access is classified by what its address is computed from (a taint walk over registers
from the kernel's parameters, read from the cubin's KPARAM_INFO): `metadata` when it derives only from
the plan's metadata pointers (and integers), `data` when any other pointer (activations, weights,
outputs, the split-K scratch) contributes.

Round trips are counted by issuing the instructions of one path in order, as a warp does: an
instruction issues when its operands are ready (a global load's value is ready one round trip after it
issued; a fence waits for the stores and loads before it and costs one; an atomic's value one), and
nothing issues before the instruction ahead of it.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import triton

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"  # cuobjdump ships with Triton

# the plan metadata a LoRA kernel may read before its grid-dependency wait (kernels/common.py)
METADATA = frozenset({"sorted_ids_ptr", "tiles_ptr", "n_tiles_ptr", "ranks_ptr"})
CBANK_PARAMS = 0x210  # sm_90: kernel parameters start at c[0x0][0x210]
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T\d]\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_REG = re.compile(r"(?<![\w.])(U?R\d+|U?P\d|RZ|URZ|PT|UPT)(\.64|\.reuse)*\b")
_CBANK = re.compile(r"c\[0x0\]\[(0x[0-9a-f]+)\]")
_KPARAM = re.compile(r"Ordinal\s*:\s*0x([0-9a-f]+)\s+Offset\s*:\s*0x([0-9a-f]+)\s+Size\s*:\s*0x([0-9a-f]+)")

GLOBAL_LOADS = ("LDG", "LD")
STORES = ("STG", "ST", "RED", "REDG")
ATOMICS = ("ATOMG", "ATOM")
NO_DEST = {"STG", "ST", "STS", "STL", "RED", "REDG", "BRA", "EXIT", "BAR", "MEMBAR", "LDGSTS", "LDGDEPBAR",
           "DEPBAR", "ACQBULK", "NOP", "WARPSYNC", "BSSY", "BSYNC", "CALL", "RET", "ERRBAR", "CGAERRBAR", "CCTL",
           "FENCE", "YIELD", "BPT", "SYNCS", "UCGABAR_ARV", "UCGABAR_WAIT"}
_CONST_REGS = {"RZ", "URZ", "PT", "UPT"}


@dataclass
class Ins:
    addr: int
    op: str  # full opcode with modifiers, e.g. LDG.E.128
    args: str
    pred: str | None = None  # guarding predicate register (negation dropped)
    dests: list = field(default_factory=list)
    srcs: list = field(default_factory=list)
    cbank: list = field(default_factory=list)  # parameter-bank offsets read
    addr_regs: list = field(default_factory=list)  # registers of the [address] operand (memory ops)

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    def is_memory(self) -> bool:
        return self.base in GLOBAL_LOADS + STORES + ATOMICS or self.base == "LDGSTS"


def _regs(text: str) -> list[str]:
    out = []
    for m in _REG.finditer(text):
        r = m.group(1)
        if r in _CONST_REGS:
            continue
        out.append(r)
        if ".64" in (m.group(0)[len(r):]):
            out.append(_next(r))
    return out


def _next(r: str, k: int = 1) -> str:
    m = re.match(r"(U?R)(\d+)", r)
    return f"{m.group(1)}{int(m.group(2)) + k}" if m else r


def _width(op: str) -> int:
    if ".128" in op:
        return 4
    if ".64" in op or ".WIDE" in op:
        return 2
    return 1


def parse(sass: str) -> list[Ins]:
    """The instructions of the (single) function in `sass`, in address order."""
    out = []
    for line in sass.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        addr, pred, op, args = int(m.group(1), 16), m.group(2), m.group(3), m.group(4)
        ins = Ins(addr, op, args)
        if pred:
            p = pred.strip().lstrip("@").lstrip("!")
            ins.pred = None if p in ("PT", "UPT") else p
        ins.cbank = [int(c, 16) for c in _CBANK.findall(args)]
        mem = re.findall(r"\[([^\]]*)\]", args.replace("desc[", "desc("))
        ops = [a.strip() for a in re.split(r",(?![^\[]*\])", args)] if args else []
        if ins.base in NO_DEST or not ops:
            dests, srcs = [], ops
        else:
            dests, srcs = [ops[0]], ops[1:]
            while srcs and re.fullmatch(r"!?U?P[T\d]", srcs[0]) and ins.base not in ("SEL", "FSEL", "PLOP3"):
                dests.append(srcs.pop(0))  # carry-out / second predicate results (IADD3 R, P0, P1, ...)
        for d in dests:
            regs = _regs(d)
            if regs and not d.startswith("["):
                first = regs[0]
                wide = first.lstrip("U").startswith("R")  # predicates are single
                ins.dests += [_next(first, k) for k in range(_width(op))] if wide else [first]
        for s in srcs:
            ins.srcs += _regs(s)
        if mem and ins.is_memory():
            # the last [...] of a load/atomic is its global address; LDGSTS: [shared], desc[..][global]
            ins.addr_regs = _regs(mem[-1])
        out.append(ins)
    return out


def branch_target(ins: Ins) -> int | None:
    m = re.search(r"(0x[0-9a-f]+)\s*$", ins.args)
    return int(m.group(1), 16) if ins.base == "BRA" and m else None


def successors(code: list[Ins]) -> list[list[int]]:
    """Control-flow successors of each instruction (index into code)."""
    at = {ins.addr: i for i, ins in enumerate(code)}
    succ = []
    for i, ins in enumerate(code):
        nxt = [i + 1] if i + 1 < len(code) else []
        conditional = ins.pred is not None or re.search(r"!?U?P\d", ins.args.split("0x")[0] if ins.args else "")
        if ins.base == "EXIT" or ins.base == "RET":
            succ.append(nxt if ins.pred else [])
        elif ins.base == "BRA":
            tgt = at.get(branch_target(ins))
            succ.append(([tgt] if tgt is not None else []) + (nxt if conditional else []))
        else:
            succ.append(nxt)
    return succ


def param_layout(cubin: bytes) -> dict[int, tuple[int, int]]:
    """ordinal -> (constant-bank offset, size) of each kernel parameter, from the cubin's KPARAM_INFO."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        elf = subprocess.run([str(BIN / "cuobjdump"), "-elf", str(path)], capture_output=True, text=True,
                             check=True).stdout
    return {int(o, 16): (CBANK_PARAMS + int(off, 16), int(sz, 16)) for o, off, sz in _KPARAM.findall(elf)}


def param_names(layout: dict, names: list[str]) -> dict[int, str]:
    """constant-bank word offset -> the parameter it belongs to (names: the runtime arguments in order;
    Triton's own trailing parameters get 'hiddenN')."""
    out = {}
    for ordinal, (off, size) in layout.items():
        name = names[ordinal] if ordinal < len(names) else f"hidden{ordinal}"
        for b in range(0, size, 4):
            out[off + b] = name
    return out


def is_data(taint, metadata) -> bool:
    return any(n.endswith("_ptr") and n not in metadata for n in taint)


# ---- round trips --------------------------------------------------------------------------------
class _Issue:
    """One path's state, issued in order: an instruction issues when its operands are ready and not
    before the one ahead of it; a global load's (or atomic's) value is ready one round trip after it
    issued; a fence waits for every memory operation before it and takes one round trip. Alongside,
    each register's taint: the parameters its value was computed from."""

    def __init__(self, params: dict):
        self.params = params
        self.ready: dict[str, float] = {}
        self.taint: dict[str, frozenset] = {}
        self.clock = 0.0
        self.pending = 0.0  # when the latest memory operation issued completes

    def copy(self):
        c = _Issue(self.params)
        c.ready, c.taint, c.clock, c.pending = dict(self.ready), dict(self.taint), self.clock, self.pending
        return c

    def restart(self):
        """Times back to zero (the wait of a PDL launch); taints kept."""
        self.ready, self.clock, self.pending = {}, 0.0, 0.0

    def address_taint(self, ins: Ins) -> frozenset:
        t = set()
        for r in ins.addr_regs:
            t |= self.taint.get(r, frozenset())
        return frozenset(t | {self.params[c] for c in ins.cbank if c in self.params})

    def step(self, ins: Ins) -> float:
        """Issue `ins`; returns when its result (for a memory operation: its data) is there."""
        srcs = ins.srcs + ([ins.pred] if ins.pred else [])
        t = max([self.clock] + [self.ready.get(r, 0.0) for r in srcs])
        if ins.base in ("MEMBAR", "FENCE"):
            self.clock = max(t, self.pending) + 1
            return self.clock
        mem = ins.base in GLOBAL_LOADS + ATOMICS + STORES or ins.base == "LDGSTS"
        done = t + 1 if mem else t
        if mem:
            self.pending = max(self.pending, done)
        if ins.dests:
            taint = set()
            for r in srcs:
                taint |= self.taint.get(r, frozenset())
            taint = frozenset(taint | {self.params[c] for c in ins.cbank if c in self.params})
            for d in ins.dests:
                self.ready[d] = done
                self.taint[d] = taint
        self.clock = t
        return done


def _walk(code, params, start=0, limit=20000):
    """Depth-first over the forward paths from `start` (loops taken once): yields (index, state before
    the instruction, successors); the caller returns False from .send() to stop a path."""
    succ = successors(code)
    stack, n = [(start, _Issue(params))], 0
    while stack and n < limit:
        i, st = stack.pop()
        n += 1
        go = yield i, st
        if go is False:
            continue
        nxt = [j for j in succ[i] if j > i]
        for k, j in enumerate(nxt):
            stack.append((j, st if k == len(nxt) - 1 else st.copy()))


def _drive(gen, visit):
    """Run _walk, calling visit(i, st) -> bool (False: stop that path)."""
    try:
        i, st = next(gen)
        while True:
            i, st = gen.send(visit(i, st))
    except StopIteration:
        pass


def pre_wait_problems(code, params, metadata) -> list[str]:
    """What a program may do before its wait that it must not: touch any memory but the plan's
    metadata, or exit (a grid whose programs all exit before waiting would not order its predecessor's
    writes)."""
    bad = set()

    def visit(i, st):
        ins = code[i]
        if ins.base == "ACQBULK":
            return False
        if ins.base in STORES + ATOMICS or ins.base == "LDGSTS":
            bad.add(f"{ins.op} at {ins.addr:#x} before the wait")
        elif ins.base in GLOBAL_LOADS and is_data(st.address_taint(ins), metadata):
            bad.add(f"{ins.op} at {ins.addr:#x} before the wait reads {sorted(st.address_taint(ins))}")
        elif ins.base == "EXIT":
            bad.add(f"EXIT at {ins.addr:#x} is reachable without passing the wait")
        st.step(ins)
        return True

    _drive(_walk(code, params), visit)
    return sorted(bad)


def round_trips(code, params, metadata, pdl: bool = False) -> dict:
    """Dependent global round trips of a kernel's programs, over every forward path from the entry:
    `chain`: the most round trips until a first data tile has arrived (the metadata chain plus the
    tile); `exits`: {address: round trips} of each EXIT reached before any data load. With pdl, the
    count restarts at the wait (what precedes it overlaps the previous kernel's tail)."""
    out = dict(chain=0.0, exits={})

    def visit(i, st):
        ins = code[i]
        if ins.base == "ACQBULK" and pdl:
            st.restart()
        data = (ins.base in GLOBAL_LOADS or ins.base == "LDGSTS") and is_data(st.address_taint(ins), metadata)
        done = st.step(ins)
        if data:
            out["chain"] = max(out["chain"], done)
            return False  # this path has reached its data
        if ins.base == "EXIT":
            out["exits"][ins.addr] = max(out["exits"].get(ins.addr, 0.0), st.clock)
        return True

    _drive(_walk(code, params), visit)
    return out


def tail_round_trips(code, params, start: int) -> float:
    """The most round trips from instruction `start` to an EXIT over forward paths (loops once): e.g.
    the split-K arrival, from the partial's store to the last arrival's exit (a store at the very end
    is not waited for: it drains while the program retires)."""
    best = [0.0]

    def visit(i, st):
        st.step(code[i])
        if code[i].base == "EXIT":
            best[0] = max(best[0], st.clock)
        return True

    _drive(_walk(code, params, start), visit)
    return best[0]


def arrival_round_trips(code, params) -> float | None:
    """Split-K: round trips from a split's partial store to the end of the last arrival (fence, the
    arrival's atomic, the partials' reads, the result's store); None without an arrival atomic."""
    atom = next((i for i, ins in enumerate(code) if ins.base == "ATOMG" and ".ADD" in ins.op), None)
    if atom is None:
        return None
    store = max((i for i in range(atom) if code[i].base == "STG"), default=atom)
    return tail_round_trips(code, params, store)


def _can_reach(code, succ, want) -> list[bool]:
    """For each instruction: can a forward path from it reach an instruction for which want(ins)?"""
    out = [False] * len(code)
    for i in range(len(code) - 1, -1, -1):
        out[i] = want(code[i]) or any(out[j] for j in succ[i] if j > i)
    return out


def _cond(ins: Ins) -> str | None:
    """The predicate a branch or exit is conditional on (`@P0 BRA`, or `BRA.U !UP0, target`)."""
    if ins.pred:
        return ins.pred
    m = re.search(r"!?(U?P\d)\s*,", ins.args) if ins.base == "BRA" else None
    return m.group(1) if m else None


def taint_before(code, params) -> list[dict]:
    """Per instruction, the parameters each register's value may come from when the instruction runs
    (a forward data-flow over the control-flow graph: a write replaces, a join unites)."""
    succ = successors(code)
    state: list[dict | None] = [None] * len(code)
    state[0] = {}
    work = [0]
    while work:
        i = work.pop()
        ins, cur = code[i], state[i]
        out = dict(cur)
        if ins.dests:
            t = set()
            for r in ins.srcs + ([ins.pred] if ins.pred else []):
                t |= cur.get(r, frozenset())
            t = frozenset(t | {params[c] for c in ins.cbank if c in params})
            for d in ins.dests:
                out[d] = t
        for j in succ[i]:
            old = state[j]
            if old is None:
                state[j] = out
                work.append(j)
                continue
            merged = None
            for r, t in out.items():
                if not t <= old.get(r, frozenset()):
                    merged = merged or dict(old)
                    merged[r] = merged.get(r, frozenset()) | t
            if merged is not None:
                state[j] = merged
                work.append(j)
    return [st or {} for st in state]


def rank_decided_skips(code, params, ranks="ranks_ptr") -> list[str]:
    """Split-K: branches on a value read through `ranks` after which one way can still reach the
    arrival atomic and the other cannot. Splits of one tile may read different ranks (nothing orders
    those reads with PDL on), so such a branch lets some splits arrive and others not: a tile whose
    counter never completes, or one that leaves a stray arrival behind."""
    succ = successors(code)
    arrive = _can_reach(code, succ, lambda ins: ins.base == "ATOMG" and ".ADD" in ins.op)
    taint = taint_before(code, params)
    bad = []
    for i, ins in enumerate(code):
        p = _cond(ins)
        if p is None or ranks not in taint[i].get(p, ()):
            continue
        fwd = [j for j in succ[i] if j > i]
        ways = {arrive[j] for j in fwd} | ({False} if ins.base == "EXIT" else set())
        if len(ways) > 1:
            bad.append(f"{ins.op} at {ins.addr:#x} decides on the rank whether this split arrives")
    return bad
