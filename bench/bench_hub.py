"""
Load on the hub (agent_loop.py hub): a real server on 127.0.0.1 with a fresh data folder, clients in threads.
Prints requests/s for reads (leaves, commits, best results, posts) and pushes/s (one-commit bundles on the
shared root, each a new leaf), with the latency spread.

    uv run bench/bench_hub.py                    # 10 s of reads with 8 clients, 100 pushes with 4
    uv run bench/bench_hub.py --seconds 2 --pushes 20
"""
import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
GIT_ENV = dict(os.environ, GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b",
               GIT_COMMITTER_EMAIL="b@b", GIT_CONFIG_NOSYSTEM="1")


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=GIT_ENV).stdout


def start_hub(data):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(REPO / "agent_loop.py"), "hub", "--listen", f"127.0.0.1:{port}",
                             "--data", str(data), "--max-pushes", "100000", "--max-posts", "100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            requests.get(url + "/api/health", timeout=1)
            return proc, url
        except requests.RequestException:
            time.sleep(0.1)
    proc.kill()
    sys.exit("the hub did not start")


def hammer(n_clients, work, stop):
    """Run work(session) in n_clients threads until stop() says so; returns the latencies in seconds."""
    latencies, lock = [], threading.Lock()

    def client():
        session = requests.Session()
        while not stop():
            t0 = time.perf_counter()
            work(session)
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def show(label, latencies, seconds):
    ms = sorted(1000 * x for x in latencies)
    print(f"{label:<46} {len(ms) / seconds:8.1f}/s   latency ms: median {statistics.median(ms):.1f}, "
          f"p90 {ms[int(0.9 * (len(ms) - 1))]:.1f}, max {ms[-1]:.1f}  ({len(ms)} in {seconds:.1f} s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="of reads (default 10)")
    parser.add_argument("--clients", type=int, default=8, help="reading threads (default 8)")
    parser.add_argument("--pushes", type=int, default=100, help="bundles to push (default 100)")
    parser.add_argument("--pushers", type=int, default=4, help="pushing threads (default 4)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-hub-"))
    proc, url = start_hub(tmp / "data")
    try:
        key = requests.post(url + "/api/register", json={"id": "bench"}).json()["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        lab = tmp / "lab"
        git(tmp, "init", "-q", "-b", "main", str(lab))
        (lab / "train.py").write_text("MATRIX_LR = 0.04\n")
        git(lab, "add", "train.py")
        git(lab, "commit", "-qm", "root")
        git(lab, "bundle", "create", "-q", str(tmp / "root.bundle"), "main")
        requests.post(url + "/api/git/push", headers=auth, data=(tmp / "root.bundle").read_bytes()).raise_for_status()
        bundles = []
        for i in range(args.pushes):  # made before timing: the clock sees the hub's work, not git's on this side
            git(lab, "checkout", "-q", "-B", f"b{i}", "main")
            (lab / "train.py").write_text(f"MATRIX_LR = 0.04\n# idea {i}\n")
            git(lab, "commit", "-qam", f"idea {i}")
            git(lab, "bundle", "create", "-q", str(tmp / f"{i}.bundle"), f"main..b{i}")
            bundles.append((tmp / f"{i}.bundle").read_bytes())

        queue, lock = list(bundles), threading.Lock()

        def push(session):
            with lock:
                body = queue.pop() if queue else None
            if body is not None:
                session.post(url + "/api/git/push", headers=auth, data=body).raise_for_status()

        t0 = time.perf_counter()
        latencies = hammer(args.pushers, push, lambda: not queue)
        show(f"pushes ({args.pushers} clients)", latencies, time.perf_counter() - t0)

        requests.post(url + "/api/channels", headers=auth, json={"name": "results", "description": ""})
        for i in range(50):
            requests.post(url + "/api/channels/results/posts", headers=auth,
                          json={"content": f"commit:{i:07x} platform:H100 val_bpb:0.99{i:02d} | keep: idea {i}"})
        paths = ["/api/git/leaves", "/api/git/commits?limit=50", "/api/results?best=1",
                 "/api/channels/results/posts?limit=50"]
        for path in paths:
            end = time.perf_counter() + args.seconds / len(paths)

            def read(session, path=path):
                session.get(url + path, headers=auth).raise_for_status()

            t0 = time.perf_counter()
            latencies = hammer(args.clients, read, lambda end=end: time.perf_counter() >= end)
            show(f"GET {path.split('?')[0]} ({args.clients} clients)", latencies, time.perf_counter() - t0)
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (1-minute); "
              f"{args.pushes + 1} commits on the hub")
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
