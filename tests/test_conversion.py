"""convert(): a Hugging Face checkpoint → a compressed one (neuzip_offload/conversion.py).

Arguments, dtype, the limit pieces are cut at (tests/test_pieces.py holds the rule itself),
resume after a kill, bounded memory, and the worker processes: the same bytes with any number
of them, scripts without a main guard or read from stdin, a failure that names its shard.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import neuzip_offload as nzo
from neuzip_offload import conversion
from neuzip_offload.checkpoint import INDEX_NAME, PROGRESS_NAME, Checkpoint, CheckpointError
from neuzip_offload.config import CodecConfig
from neuzip_offload.workers import Job, WorkerError, WorkerProcesses
from tests.helpers import tiny_llama

REPO = Path(__file__).resolve().parents[1]


def _hf_dir(tmp_path: Path, model, name: str = "hf") -> Path:
    path = tmp_path / name
    model.save_pretrained(path, max_shard_size="100KB")
    return path


def test_bad_conversion_arguments_are_refused(tmp_path):
    src = _hf_dir(tmp_path, tiny_llama())
    with pytest.raises(CheckpointError, match="does not exist"):
        nzo.convert(tmp_path / "nope", tmp_path / "x")
    with pytest.raises(CheckpointError, match="dst must differ"):
        nzo.convert(src, src)
    with pytest.raises(ValueError, match="dtype"):
        nzo.convert(src, tmp_path / "x", dtype="int8")


def test_conversion_can_change_the_dtype(tmp_path):
    src = _hf_dir(tmp_path, tiny_llama(dtype=torch.float32))
    out = nzo.convert(src, tmp_path / "nz", dtype="bf16", progress=False)
    e = Checkpoint(out).entries["model.layers.0.self_attn.q_proj.weight"]
    assert e.dtype == "bfloat16"
    kept = nzo.convert(src, tmp_path / "nz32", progress=False)
    assert Checkpoint(kept).entries["model.layers.0.self_attn.q_proj.weight"].dtype == "float32"


# ------------------------------------------------------------------------------------------
# streaming: resume after a kill, bounded memory
# ------------------------------------------------------------------------------------------


def _big_checkpoint(path: Path, shards: int = 5, rows: int = 2048) -> Path:
    """A multi-shard safetensors directory of random bf16 matrices (each shard ~rows*4 KiB*2)."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {
            f"layers.{i}.{k}.weight": (torch.randn(rows, 1024, generator=g) * 0.02).to(
                torch.bfloat16
            )
            for k in ("a", "b")
        }
        save_file(tensors, str(path / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def test_a_killed_conversion_resumes_and_gives_the_same_files(tmp_path):
    src = _big_checkpoint(tmp_path / "src", shards=6)
    whole = nzo.convert(src, tmp_path / "whole", workers=1, progress=False)
    dst = tmp_path / "resumed"
    # The child kills itself with SIGKILL at a fixed point: the third shard's file has been
    # written (atomically) but not yet recorded in the progress file, which lists two shards.
    code = textwrap.dedent(f"""
        import os, signal
        import neuzip_offload as nzo
        from neuzip_offload import conversion
        convert_shard, calls = conversion.convert_shard, []
        def convert_then_die(*args, **kwargs):
            out = convert_shard(*args, **kwargs)
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        conversion.convert_shard = convert_then_die
        nzo.convert({str(src)!r}, {str(dst)!r}, workers=1, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    progress = dst / PROGRESS_NAME
    done_before = len(json.loads(progress.read_text())["done"])
    assert done_before == 2
    assert len(list(dst.glob("neuzip-*.safetensors"))) == 3  # the third, written, not recorded
    assert not (dst / INDEX_NAME).exists()
    before = {p.name: p.stat().st_mtime_ns for p in dst.glob("neuzip-*.safetensors")}
    nzo.convert(src, dst, workers=1, progress=False)
    kept = [n for n, t in before.items() if (dst / n).stat().st_mtime_ns == t]
    assert len(kept) >= done_before  # recorded shards were not redone
    for f in sorted(whole.iterdir()):
        assert (dst / f.name).read_bytes() == f.read_bytes(), f.name
    assert not list(dst.glob("*.tmp"))


def test_conversion_memory_stays_near_one_shard(tmp_path):
    src = _big_checkpoint(tmp_path / "src", shards=10, rows=4096)  # 10 shards of 16 MiB
    largest = max(p.stat().st_size for p in src.glob("*.safetensors"))
    code = textwrap.dedent(f"""
        import threading, time, psutil, neuzip_offload as nzo
        proc = psutil.Process()
        base = proc.memory_info().rss
        peak = [base]
        stop = threading.Event()
        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.002)
        t = threading.Thread(target=watch); t.start()
        nzo.convert({str(src)!r}, {str(tmp_path / "dst")!r}, workers=1, progress=False)
        stop.set(); t.join()
        print(peak[0] - base)
    """)
    growth = int(subprocess.check_output([sys.executable, "-c", code], cwd=REPO).split()[-1])
    # one shard mapped and read, its compressed output, and the encoder's scratch
    # (~11 bytes per weight of a pass, 8 Mi weights here)
    bound = largest + largest + 11 * 8 * 2**20 + 64 * 2**20
    assert growth < bound, (growth, largest, bound)
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert growth < total  # it never holds the whole checkpoint


# ------------------------------------------------------------------------------------------
# worker processes
# ------------------------------------------------------------------------------------------


def test_one_shard_split_among_worker_processes_gives_the_same_files(tmp_path):
    """A single shard is divided among processes by size (conversion.convert_shard); the files
    and index equal those of one process, byte for byte. (Which process converts which part
    depends on when the workers are ready; the next test gives the workers every part.)"""
    src = tmp_path / "hf"
    tiny_llama(layers=3).save_pretrained(src)  # one shard
    assert len(list(src.glob("*.safetensors"))) == 1
    one = nzo.convert(src, tmp_path / "one", workers=1, progress=False)
    two = nzo.convert(src, tmp_path / "two", workers=2, progress=False)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    for name in names:
        if name.endswith((".safetensors", ".json")) and "progress" not in name:
            assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_a_shard_converted_by_worker_processes_is_the_same_file(tmp_path):
    """convert() lets this process take jobs while its workers start, so a small conversion
    may never reach them: here the shard goes to the workers alone, whole or divided."""
    src = tmp_path / "hf"
    tiny_llama(layers=3).save_pretrained(src)
    (shard,) = src.glob("*.safetensors")
    args = (CodecConfig(), None, 40_000)  # a limit that cuts the embedding into pieces
    outs = {k: tmp_path / k / "x.safetensors" for k in ("here", "divided", "whole")}
    for out in outs.values():
        out.parent.mkdir()
    here = conversion.convert_shard(shard, outs["here"], *args)
    with WorkerProcesses(2, local=False) as procs:
        divided = conversion.convert_shard(shard, outs["divided"], *args, procs)
        [(_, whole)] = procs.run([Job(conversion.convert_shard, (shard, outs["whole"], *args), "")])
    assert here == divided == whole
    assert any("[1]" in p[0] for e in here.values() for p in e.get("pieces", []))
    data = outs["here"].read_bytes()
    assert outs["divided"].read_bytes() == data and outs["whole"].read_bytes() == data


_SCRIPT = """
import os
from pathlib import Path
import neuzip_offload as nzo
from neuzip_offload.workers import Job, WorkerProcesses

# no `if __name__ == "__main__":` guard: a worker that ran this file again would say so here
with open({runs!r}, "a") as f:
    print(os.getpid(), file=f)
src, out = Path({src!r}), Path({out!r})
nzo.convert(src, out, workers=2, progress=False)
with WorkerProcesses(2, local=False) as procs:
    pids = [pid for _, pid in procs.run([Job(os.getpid, (), "pid")] * 2)]
print("workers", *pids, "parent", os.getpid())
"""


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_scripts_without_a_main_guard_or_from_stdin_convert_with_workers(tmp_path, how):
    src = _hf_dir(tmp_path, tiny_llama())
    one = nzo.convert(src, tmp_path / "one", workers=1, progress=False)
    runs = tmp_path / "runs.txt"
    code = _SCRIPT.format(runs=str(runs), src=str(src), out=str(tmp_path / "two"))
    if how == "file":
        (tmp_path / "script.py").write_text(code)
        cmd, stdin = [sys.executable, str(tmp_path / "script.py")], None
    else:
        cmd, stdin = [sys.executable, "-"], code
    proc = subprocess.run(cmd, input=stdin, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    workers, parent = {int(w) for w in words[1:3]}, int(words[4])
    assert parent not in workers  # (one worker may take both jobs)
    assert runs.read_text().split() == [str(parent)]  # the script ran once, in the parent
    for f in sorted(one.iterdir()):
        if f.name != PROGRESS_NAME:
            assert (tmp_path / "two" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("workers", [1, 2])
def test_a_damaged_input_shard_is_named_and_the_rerun_resumes(tmp_path, workers):
    src = _big_checkpoint(tmp_path / "src", shards=3, rows=256)
    whole = nzo.convert(src, tmp_path / "whole", workers=1, progress=False)
    shard = sorted(src.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    # 1000 bytes its header does not cover: read as safetensors, it is refused
    shard.write_bytes(data + bytes(1000))
    with pytest.raises(WorkerError, match=shard.name):
        nzo.convert(src, tmp_path / "nz", workers=workers, progress=False)
    assert not (tmp_path / "nz" / INDEX_NAME).exists()
    shard.write_bytes(data)  # repaired: the rerun converts what is missing
    nzo.convert(src, tmp_path / "nz", workers=workers, progress=False)
    for f in sorted(whole.iterdir()):
        assert (tmp_path / "nz" / f.name).read_bytes() == f.read_bytes(), f.name


def test_a_failure_in_a_worker_names_the_shard_and_carries_its_traceback(tmp_path):
    src = _big_checkpoint(tmp_path / "src", shards=1, rows=256)
    (shard,) = src.glob("*.safetensors")
    shard.write_bytes(shard.read_bytes() + bytes(1000))
    job = Job(
        conversion.convert_shard, (shard, tmp_path / "o", CodecConfig(), None, 1 << 20), str(shard)
    )
    with (
        pytest.raises(WorkerError, match=f"{shard}.*worker process") as info,
        WorkerProcesses(1, local=False) as procs,
    ):
        list(procs.run([job]))
    assert "Traceback" in str(info.value.__cause__)  # the worker's own


def test_every_file_beside_the_weights_is_carried_over(tmp_path):
    src = tmp_path / "src"
    tiny_llama().save_pretrained(src)
    companions = {
        "tokenizer.json": "{}",
        "chat_template.jinja": "{{ messages }}",
        "special_tokens_map.json": "{}",
        "1_Pooling/config.json": "{}",
    }
    for name, text in companions.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    (src / ".gitattributes").write_text("*.bin lfs")
    torch.save({}, src / "pytorch_model.bin")  # another format's weights: not carried
    out = nzo.convert(src, tmp_path / "out", progress=False)
    carried = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert set(companions) | {"config.json", "generation_config.json"} <= carried
    assert not carried & {".gitattributes", "pytorch_model.bin", "model.safetensors"}
    for name, text in companions.items():
        assert (out / name).read_text() == text


def test_save_compressed_cuts_pieces_as_convert_does(tmp_path):
    """So that what it writes loads at the budget the model dispatches at."""
    model = tiny_llama(tied=False)  # a 1000 x 64 embedding and head, beside 4 small layers
    model.save_pretrained(tmp_path / "hf")
    converted = Checkpoint(nzo.convert(tmp_path / "hf", tmp_path / "a", progress=False))
    saved = Checkpoint(nzo.save_compressed(model, tmp_path / "b", progress=False))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        ranges = [[(a, b) for _, _, a, b in ck.entries[name].pieces] for ck in (converted, saved)]
        assert ranges[0] == ranges[1] and len(ranges[0]) > 1, name
