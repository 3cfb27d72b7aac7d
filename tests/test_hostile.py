"""Hostile files against the pickle readers of unet.py (EDM network pickles) and fid.py (detector weights, .npz).

Each file here is built by hand, opcode by opcode where the pickler would refuse to write it, to make a reader crash
the interpreter, allocate far more than the file holds, or fail with an error that does not name the file. The
readers run in a child interpreter whose address space may grow by LIMIT bytes only (RLIMIT_AS, set after the
imports), so that a regression fails the test with a MemoryError instead of taking the machine's memory, and a
segfault fails it instead of killing pytest. Every refusal must be a ValueError or UnpicklingError naming the file.
"""
import io
import json
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 600 << 20                                                  # bytes the child may add after importing torch

CHILD = r"""
import json, os, resource, sys
sys.path.insert(0, sys.argv[3])
import numpy as np, torch
torch.set_num_threads(1)
import fid, unet
cases = json.load(open(sys.argv[1]))
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[4]), vm + int(sys.argv[4])))
out = {}
for name, code in cases.items():
    try:
        exec(code, {"fid": fid, "unet": unet, "np": np, "torch": torch})
        out[name] = {"type": None, "msg": ""}
    except BaseException as e:
        out[name] = {"type": type(e).__name__, "msg": str(e)[:3000]}
    json.dump(out, open(sys.argv[2], "w"))                     # after each case: a crash keeps the ones before
"""


def run_child(tmp_path, cases, timeout=300):
    """{name: {"type", "msg"}} from running each case's code in one memory-limited child; (returncode, output) too."""
    spec, result, script = tmp_path / "cases.json", tmp_path / "result.json", tmp_path / "child.py"
    spec.write_text(json.dumps(cases))
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), str(spec), str(result), ROOT, str(LIMIT)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    outcomes = json.loads(result.read_text()) if result.exists() else {}
    return outcomes, proc.returncode, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------------------------
# A small pickle assembler (protocol 2 opcodes), for files no pickler writes.

PROTO, STOP, MARK, DICT, LIST, SETITEMS, TUPLE1, TUPLE2, REDUCE, NONE = (b"\x80\x02", b".", b"(", b"}", b"]", b"u",
                                                                         b"\x85", b"\x86", b"R", b"N")


def s(text):
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw                  # BINUNICODE


def i(n):
    return b"J" + struct.pack("<i", n)                                # BININT


def put(k):
    return b"r" + struct.pack("<I", k)                                # LONG_BINPUT


def get(k):
    return b"j" + struct.pack("<I", k)                                # LONG_BINGET


def glob(module, name):
    return b"c" + f"{module}\n{name}\n".encode()                      # GLOBAL


def dict_of(*pairs):
    return DICT + MARK + b"".join(k + v for k, v in pairs) + SETITEMS


def list_of(*items):
    return LIST + MARK + b"".join(items) + b"e"                       # APPENDS


def node(class_name, state):
    """torch_utils.persistence._reconstruct_persistent_obj(dict(type='class', version=6, class_name, state))."""
    meta = dict_of((s("type"), s("class")), (s("version"), i(6)), (s("class_name"), class_name), (s("state"), state))
    return glob("torch_utils.persistence", "_reconstruct_persistent_obj") + meta + TUPLE1 + REDUCE


def module_state(modules=DICT, parameters=DICT, **extra):
    pairs = [(s("_parameters"), parameters), (s("_buffers"), DICT), (s("_modules"), modules)]
    return dict_of(*pairs, *[(s(k), v) for k, v in extra.items()])


TINY_KWARGS = dict_of((s("img_resolution"), i(8)), (s("img_channels"), i(3)), (s("model_channels"), i(16)),
                      (s("channel_mult"), list_of(i(1))), (s("num_blocks"), i(1)), (s("attn_resolutions"), LIST))


def edm_root(preamble, modules):
    """{'ema': EDMPrecond node with usable _init_kwargs and the given _modules}, so a reader gets to the module tree."""
    ema = node(s("EDMPrecond"), module_state(modules, _init_args=b")", _init_kwargs=TINY_KWARGS))  # ) = ()
    return PROTO + preamble + dict_of((s("ema"), ema)) + STOP


def legacy_storage(n, declared=None):
    """torch.storage._load_from_bytes' argument: a legacy torch.save of an n-float storage, optionally claiming
    `declared` elements (torch allocates the claim before it reads the bytes)."""
    f = io.BytesIO()
    torch.save(torch.zeros(n)._typed_storage(), f, _use_new_zipfile_serialization=False)
    raw = f.getvalue()
    if declared is not None:
        at = raw.index(b"K" + bytes([n]), raw.index(b"cpu"))          # BININT1 n, the record's element count
        raw = raw[:at] + i(declared) + raw[at + 2:]
    return raw


def binbytes(raw):
    return b"B" + struct.pack("<I", len(raw)) + raw                   # BINBYTES


# ------------------------------------------------------------------------------------------------------------------
# The files.

def laughs(depth):
    """L0 = [], L(k) = [L(k-1), L(k-1)] through memo references: 10 bytes a level, str() of L(depth) ~ 2**depth."""
    ops = LIST + put(0)
    for k in range(1, depth + 1):
        ops += MARK + get(k - 1) + get(k - 1) + b"l" + put(k)           # LIST from the mark
    return ops, get(depth)


def deep_chain(depth):
    """A module nested `depth` deep, built innermost first (flat in the stream, deep in the result)."""
    ops = node(s("UNetBlock"), module_state()) + put(0)
    for k in range(1, depth):
        ops += node(s("UNetBlock"), module_state(dict_of((s("m"), get(k - 1))))) + put(k)
    return ops, get(depth - 1)


def doubling_tree(depth):
    """Module k has two children, both module k-1: 2**depth paths to one leaf holding one tensor."""
    w = glob("torch._utils", "_rebuild_tensor_v2") + MARK + glob("torch.storage", "_load_from_bytes") + \
        binbytes(legacy_storage(1)) + TUPLE1 + REDUCE + i(0) + MARK + i(1) + b"t" + MARK + i(1) + b"t" + \
        b"\x89" + glob("collections", "OrderedDict") + b")" + REDUCE + b"t" + REDUCE          # NEWFALSE, TUPLE
    ops = node(s("Conv2d"), module_state(parameters=dict_of((s("weight"), w)))) + put(0)
    for k in range(1, depth + 1):
        ops += node(s("UNetBlock"), module_state(dict_of((s("a"), get(k - 1)), (s("b"), get(k - 1))))) + put(k)
    return ops, get(depth)


def cycle():
    """A module whose only child is itself: its _modules dict is filled in after the module is built."""
    modules = DICT + put(0)
    ops = node(s("EDMPrecond"), module_state(modules, _init_args=b")", _init_kwargs=TINY_KWARGS)) + put(1)
    ops += b"0" + get(0) + s("self") + get(1) + b"s" + b"0"                # POP, SETITEM into the dict, POP
    return ops, get(1)


def repeated_storage(times, n=1 << 18):
    """One 1 MB storage blob handed to _load_from_bytes `times` times through a memo reference."""
    ops = binbytes(legacy_storage(n)) + put(0)
    calls = [glob("torch.storage", "_load_from_bytes") + get(0) + TUPLE1 + REDUCE for _ in range(times)]
    return ops, list_of(*calls)


def shared_state(n=20000):
    """One n-entry dict given by memo reference as the BUILD state of n OrderedDicts (each would copy all of it)."""
    state = DICT + MARK + b"".join(s(f"k{k}") + NONE for k in range(n)) + SETITEMS + put(0)
    ops = state + glob("collections", "OrderedDict") + put(1) + b"0"                 # POP the class
    return ops, list_of(*[get(1) + b")" + REDUCE + get(0) + b"b" for _ in range(n)])  # cls(), BUILD


def storage_claimed_twice():
    """A legacy torch.save whose main pickle names storage key '0' twice: first with 2**30 floats, then with 4 (torch
    allocates the first claim; a check that kept the last one would let it through)."""
    raw = legacy_storage(4)
    head = raw.index(b"\x80\x02(X\x07\x00\x00\x00storage")                     # the main pickle, after 3 small ones
    main = raw[head:raw.index(b".", head) + 1]
    claim = main[2:main.index(b"Q")]                                                 # MARK ... TUPLE, before BINPERSID
    twice = PROTO + claim.replace(b"K\x04", i(2 ** 30)) + b"Q" + claim + b"Q" + TUPLE2 + STOP
    return raw[:head] + twice + raw[head + len(main):]


def void_scalar(name="V8", encode=True):
    """numpy.dtype(name) with a state that gives it an object field while hasobject reads False (flags 0), then
    numpy's scalar of that dtype from 8 chosen bytes (a pointer), then _codecs.encode or repr of it."""
    obj = glob("numpy", "dtype") + s("O8") + b"\x89\x88" + b"\x87" + REDUCE + \
        MARK + i(3) + s("|") + NONE + NONE + NONE + i(-1) + i(-1) + i(63) + b"t" + b"b"      # TUPLE3, BUILD
    dtype = glob("numpy", "dtype") + s(name) + b"\x89\x88" + b"\x87" + REDUCE + \
        MARK + i(3) + s("|") + NONE + MARK + s("a") + b"t" + dict_of((s("a"), MARK + obj + i(0) + b"t")) + \
        i(8) + i(1) + i(0) + b"t" + b"b"
    scalar = glob("numpy._core.multiarray", "scalar") + dtype + b"C\x08" + b"A" * 8 + TUPLE2 + REDUCE
    return glob("_codecs", "encode") + scalar + s("latin1") + TUPLE2 + REDUCE if encode else scalar


def npy(shape, descr, data):
    """An .npy member whose header declares `shape` whatever the data (the header alone drives np.load's allocation)."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + data


def npz(members):
    f = io.BytesIO()
    with zipfile.ZipFile(f, "w") as z:
        for name, raw in members.items():
            z.writestr(name + ".npy", raw)
    return f.getvalue()


def deflated_zeros_npz(n):
    """An honest .npz whose one member is n uint8 images of 64x64x3 zeros, deflated (about 1000x smaller), written in
    chunks so that the test never holds the inflated bytes."""
    f = io.BytesIO()
    with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z, z.open("arr_0.npy", "w", force_zip64=True) as member:
        member.write(npy((n, 64, 64, 3), "|u1", b""))
        for _ in range(n // 100):
            member.write(bytes(100 * 64 * 64 * 3))
    return f.getvalue()


def saved_npz(**arrays):
    f = io.BytesIO()
    np.savez(f, **arrays)
    return f.getvalue()


def torch_legacy(obj):
    f = io.BytesIO()
    torch.save(obj, f, _use_new_zipfile_serialization=False)
    return f.getvalue()


def pth_declaring(nbytes):
    """pytorch-fid's .pth layout (legacy torch.save) whose one storage declares nbytes // 4 floats but holds 4."""
    raw = torch_legacy({"w": torch.zeros(4)})
    at = raw.index(b"K\x04", raw.index(b"cpu"))
    return raw[:at] + i(nbytes // 4) + raw[at + 2:]


def stride0_bn():
    """The first pytorch-fid layer with a batch-norm scale that is one number viewed as 2**33 of them."""
    layer = "Conv2d_1a_3x3"
    return torch_legacy({f"{layer}.conv.weight": torch.zeros(32, 3, 3, 3),
                         f"{layer}.bn.weight": torch.ones(1).expand(2 ** 33),
                         **{f"{layer}.bn.{k}": torch.zeros(32) for k in ("bias", "running_mean", "running_var")}})


UNET, FID, IMAGES, STATS = ("unet.load_edm_pickle(P)", "fid.read_inception_weights(P)", "fid.image_batches(P)",
                            "fid.load_stats(P)")
MEMO = {k: PROTO + NONE + put(k) + STOP for k in (2 ** 27, 2 ** 32 - 1)}               # 12 bytes each


def pickle_cases():
    """{case: (file name, bytes, reader call, expected words in the error)} for the two pickle readers."""
    laugh_ops, laugh = laughs(40)
    chain_ops, chain = deep_chain(3000)
    tree_ops, tree = doubling_tree(30)
    cycle_ops, cyc = cycle()
    rep_ops, rep = repeated_storage(3000)
    big = glob("torch.storage", "_load_from_bytes") + binbytes(legacy_storage(4, 2 ** 30)) + TUPLE1 + REDUCE
    encode_laugh = glob("_codecs", "encode") + laugh + s("latin1") + TUPLE2 + REDUCE

    def ema(value, preamble=b""):
        return PROTO + preamble + dict_of((s("ema"), value)) + STOP

    cases = {f"{name} memo index {k}": ("memo.pkl", raw, call, "memo index")
             for k, raw in MEMO.items() for name, call in (("unet", UNET), ("fid", FID))}
    state_ops, instances = shared_state()
    twice = glob("torch.storage", "_load_from_bytes") + binbytes(storage_claimed_twice()) + TUPLE1 + REDUCE
    cases.update({"unet one state BUILT into 20000 OrderedDicts": ("build.pkl", ema(instances, state_ops), UNET,
                                                                   "8 attributes"),
                  "fid one state BUILT into 20000 OrderedDicts": ("build.pkl", PROTO + state_ops + instances + STOP,
                                                                  FID, "8 attributes"),
                  "unet storage key claimed twice": ("twice.pkl", ema(twice), UNET, "declares")})
    return {**cases,
            "unet billion laughs in a class name": ("laughs.pkl", ema(node(laugh, module_state()), laugh_ops), UNET,
                                                    "class name"),
            "fid billion laughs into _codecs.encode": ("laughs.pkl", PROTO + laugh_ops + encode_laugh + STOP, FID,
                                                       "only on text"),
            "unet one storage loaded 3000 times": ("rep.pkl", ema(rep, rep_ops), UNET, "more data than it holds"),
            "fid one storage loaded 3000 times": ("rep.pkl", PROTO + rep_ops + rep + STOP, FID, "more data than"),
            "unet storage declaring 4 GB": ("big.pkl", ema(big), UNET, "declares"),
            "fid .pth storage declaring 4 GB": ("big.pth", pth_declaring(1 << 32), FID, "declare"),
            "unet legacy checkpoint declaring 4 GB": ("big.pt", pth_declaring(1 << 32), "unet.load_checkpoint(P)",
                                                      "declare"),
            "unet 3000-deep module chain": ("chain.pkl", edm_root(chain_ops, dict_of((s("model"), chain))), UNET,
                                            "blocks than"),
            "unet module that is its own child": ("cycle.pkl", ema(cyc, cycle_ops), UNET, "occurs twice"),
            "unet 2**30 paths to one module": ("tree.pkl", edm_root(tree_ops, dict_of((s("model"), tree))), UNET,
                                               "occurs twice"),
            "fid 2**30 paths to one module": ("tree.pkl", PROTO + tree_ops + tree + STOP, FID, "occurs twice"),
            "fid stride-0 batch-norm scale": ("bn.pth", stride0_bn(), FID, "expanded view"),
            "unet _init_args that is a tensor": ("args.pkl", ema(node(s("EDMPrecond"), module_state(
                _init_args=tensor_ops(), _init_kwargs=TINY_KWARGS))), UNET, "no usable recorded constructor"),
            "unet _non_persistent_buffers_set that is a tensor": ("skip.pkl", ema(node(s("EDMPrecond"), module_state(
                _non_persistent_buffers_set=tensor_ops(), _init_args=b")", _init_kwargs=TINY_KWARGS))), UNET,
                "_non_persistent_buffers_set that is a Tensor")}


def tensor_ops():
    """torch._utils._rebuild_tensor_v2 of a 2-float legacy storage: a tensor where the reader expects a tuple or a set
    (whose truth value torch refuses for more than one element)."""
    storage = glob("torch.storage", "_load_from_bytes") + binbytes(legacy_storage(2)) + TUPLE1 + REDUCE
    return (glob("torch._utils", "_rebuild_tensor_v2") + MARK + storage + i(0) + MARK + i(2) + b"t" + MARK + i(1)
            + b"t" + b"\x89" + glob("collections", "OrderedDict") + b")" + REDUCE + b"t" + REDUCE)


def hostile_files():
    return {**pickle_cases(), **npz_cases()}


def npz_cases():
    images = saved_npz(arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    stats = saved_npz(mu=np.zeros(3), sigma=np.eye(3))
    huge = npz({"arr_0": npy((10 ** 12, 4, 4, 3), "|u1", bytes(96))})
    huge_stats = npz({"mu": npy((10 ** 12,), "<f8", bytes(24)), "sigma": npy((3, 3), "<f8", bytes(72))})
    objects = {"arr_0": np.array([{"a": 1}] * 2, dtype=object)}
    return {
        "images: object array": ("obj.npz", saved_npz(**objects), IMAGES, "object"),
        "images: truncated zip": ("cut.npz", images[:len(images) // 2], IMAGES, "cannot read"),
        "images: string array": ("str.npz", saved_npz(arr_0=np.array([[["a"] * 3] * 4] * 4)), IMAGES, "uint8 image"),
        "images: header declaring 10**12 images": ("huge.npz", huge, IMAGES, "stored in"),
        "images: 61 MB of zeros deflated into 60 KB": ("bomb.npz", deflated_zeros_npz(5000), IMAGES, "compressed"),
        "stats: object arrays": ("obj.npz", saved_npz(mu=objects["arr_0"], sigma=objects["arr_0"]), STATS, "object"),
        "stats: truncated zip": ("cut.npz", stats[:len(stats) // 2], STATS, "cannot read"),
        "stats: string arrays": ("str.npz", saved_npz(mu=np.array(["x"] * 3), sigma=np.array([["x"] * 3] * 3)), STATS,
                                 "numbers"),
        "stats: header declaring 10**12 dims": ("huge.npz", huge_stats, STATS, "stored in"),
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case of hostile_files() read in one memory-limited child: {case: (path, expected, {"type", "msg"})}."""
    root = tmp_path_factory.mktemp("hostile")
    cases, expected = {}, {}
    for k, (case, (name, raw, call, words)) in enumerate(hostile_files().items()):
        path = root / f"{k}_{name}"
        path.write_bytes(raw)
        cases[case] = f"P = {str(path)!r}\n{call}"
        expected[case] = (str(path), words)
    results, code, output = run_child(root, cases)
    assert code == 0 and set(results) == set(cases), output[-3000:]
    return {case: (*expected[case], results[case]) for case in cases}


@pytest.mark.parametrize("case", list(hostile_files()))
def test_hostile_file_gives_one_clear_error(outcomes, case):
    path, words, got = outcomes[case]
    assert got["type"] in ("ValueError", "UnpicklingError", "ForbiddenGlobal"), got
    assert got["msg"].startswith(path) and words in got["msg"], got


@pytest.mark.parametrize("reader", ["fid", "unet"])
@pytest.mark.parametrize("name", ["V8", "f8"])
def test_object_typed_numpy_scalar_is_refused_not_dereferenced(tmp_path, reader, name):
    """The 200-byte file that made numpy read a pointer from the file (SIGSEGV in fid.py's reader), and the same
    trick on an 'f8', whose name is allowed: a child that crashes exits with a negative code and fails the test."""
    body = void_scalar(name, encode=reader == "fid")                 # fid: _codecs.encode(str(scalar)); unet: the value
    path = tmp_path / "scalar.pkl"
    path.write_bytes(PROTO + dict_of((s("ema"), body)) + STOP)
    results, code, output = run_child(tmp_path, {"scalar": f"P = {str(path)!r}\n{UNET if reader == 'unet' else FID}"})
    assert code == 0, f"the reader crashed the interpreter (exit code {code}): {output[-2000:]}"
    got = results["scalar"]
    assert got["type"] in ("ValueError", "UnpicklingError") and got["msg"].startswith(str(path)), got
    assert "plain numeric" in got["msg"], got


def expand_every_tensor(module, dtype):
    """module, each of its parameters and buffers replaced by the number 0.5 viewed at the tensor's shape (stride 0)."""
    for m in module.modules():
        for group in (m._parameters, m._buffers):
            for k, t in group.items():
                if t is not None:
                    group[k] = torch.full([1], 0.5, dtype=dtype, device="cpu").expand(t.shape)
    return module


def test_stride0_views_stay_views_until_the_shapes_match(tmp_path):
    """An EDM pickle declaring a 4x larger network (1.2G parameters) whose fp16 tensors are each one number viewed
    at full shape. It is a valid file and loads, but as views: converting to float32 costs the storages (bytes), not
    the 4.7 GB of the declared shapes. The same stride-0 views carry the full-size meta test in test_unet_edm.py (and
    one of over 2^31 weights is refused: test_edm_networks_too_large_to_use_are_refused_before_anything_is_allocated)."""
    from test_unet_edm import write_edm_pickle
    kwargs = {**unet.EDM_IMAGENET64, "model_channels": 384}
    with torch.device("meta"):
        src = expand_every_tensor(unet.EDMPrecond(**kwargs), torch.float16)
    path = tmp_path / "wide.pkl"
    write_edm_pickle(path, src, tmp_path / "marker", root_kwargs={**kwargs, "model_type": "DhariwalUNet"})
    assert path.stat().st_size < 10 << 20
    check = ("net = unet.load_edm_pickle(P)\n"
             "assert sum(p.numel() for p in net.parameters()) > 10 ** 9\n"
             "assert all(p.dtype == torch.float32 and p.untyped_storage().nbytes() == 4 for p in net.parameters())\n"
             "assert all(p[(0,) * p.dim()].item() == 0.5 for p in net.parameters())")
    results, code, output = run_child(tmp_path, {"wide": f"P = {str(path)!r}\n{check}"})
    assert code == 0 and results["wide"]["type"] is None, (results, output[-2000:])


def test_tensor_records_come_back_as_plain_values():
    """A BUILD in a pickle can call Tensor.__setstate__ on a tensor record and set requires_grad (or hooks); the
    readers hand back detached values, so nothing the file set on a tensor travels into the model."""
    import fid
    import unet
    w = torch.ones(3).requires_grad_(True)
    w.register_hook(lambda g: g * 0)
    node = unet._Node()
    node.__setstate__({"_parameters": {"weight": w}, "_buffers": {}, "_modules": {}})
    out = unet.persistent_state_dict(node)
    assert not out["weight"].requires_grad and out["weight"]._backward_hooks is None
    fid_node = fid._Node()
    fid_node.__setstate__({"_parameters": {"weight": w}, "_buffers": {}, "_modules": {}})
    got = fid._flatten(fid_node)["weight"]
    assert not got.requires_grad and got._backward_hooks is None
