"""One dispatched model, several threads: every answer right (forwards are serialized)."""

from __future__ import annotations

import copy
import threading

import torch

import neuzip_offload as nzo
from tests.helpers import model_bytes, same_bits, tiny_llama


def test_forwards_from_several_threads_give_the_right_answers():
    plain = tiny_llama()
    model = nzo.dispatch(
        copy.deepcopy(plain), max_gpu_mem=int(0.6 * model_bytes(plain)), reserve=0, progress=False
    )
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 1000, (1, 8 + i % 5), generator=g) for i in range(24)]
    with torch.no_grad():
        expected = [plain(x).logits for x in inputs]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(t: int) -> None:
        start.wait()
        try:
            for i in range(t, len(inputs), 4):
                with torch.no_grad():
                    results[i] = model(inputs[i]).logits
        except BaseException as e:  # reported below, with the others
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:2]
    wrong = [i for i in range(len(inputs)) if not same_bits(results[i], expected[i])]
    assert not wrong, f"{len(wrong)} of {len(inputs)} forwards wrong"
