"""The memory count train.py checks before compiling (autoresearch/memory.py), against the peak resident memory
of real training steps on the CPU, in fresh processes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.long(minutes=1)  # on one core; conftest hands out the longest files first

# a few real steps of train.py's model and optimizer; prints the count and the peak growth of anonymous RSS
MEASURE = """
import json, os, sys, tempfile, threading, time
os.environ.update(AUTORESEARCH_PROFILE="smoke", AUTORESEARCH_CACHE_DIR=tempfile.mkdtemp())
import torch, train
from autoresearch.memory import estimate_training_memory, flash_like_attention
torch.set_num_threads(2)
B, T, d, depth, V = (int(a) for a in sys.argv[1:6])
config = train.GPTConfig(sequence_len=T, vocab_size=V, n_layer=depth, n_embd=d, head_dim=64, window_pattern="L")
counted = estimate_training_memory(lambda: train.GPT(config, flash_like_attention), B, T, V, "cpu", None).peak
x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
def anonymous():  # resident anonymous memory: what the steps allocate, unlike file pages the kernel may drop
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))
peak, done = [0], threading.Event()
def sample():  # the peak is inside backward; torch releases the GIL there
    while not done.is_set():
        peak[0] = max(peak[0], anonymous())
        time.sleep(0.0005)
before = anonymous()
sampler = threading.Thread(target=sample)
sampler.start()
model = train.GPT(config)
model.init_weights()
optimizer = train.make_optimizer(model, compiled=False, ortho_dtype=torch.float32)
for _ in range(2):
    model(x, y).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
done.set()
sampler.join()
measured = max(peak[0], anonymous()) - before
print(json.dumps({"counted": counted, "measured": measured}))
"""


@pytest.mark.parametrize("batch, seq, width, depth, vocab", [
    (16, 256, 128, 4, 8192),   # the cpu profile's shape, whole logits: the lm_head's output dominates
    (16, 256, 256, 4, 8192),   # twice the width (twice the rows too cost 35 s on 2 cores, for no other path)
    (8, 512, 256, 2, 4096),    # a longer context, fewer layers
])
def test_memory_count_is_within_a_quarter_of_the_measured_peak(batch, seq, width, depth, vocab):
    result = subprocess.run([sys.executable, "-c", MEASURE, str(batch), str(seq), str(width), str(depth), str(vocab)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0.75 <= numbers["counted"] / numbers["measured"] <= 1.25, numbers
