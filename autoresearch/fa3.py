"""
Flash Attention 3 from the Hugging Face kernels hub: the one place that decides whether it can be loaded.
train.py calls load_flash_attention_3() once; None means "use another backend", with the reason printed.
"""

import os
import threading

HUB_REPO = "kernels-community/flash-attn3"
PROBE_TIMEOUT_S = 2.0


def first_line(error):
    """A one-line description of an exception, also when its message is empty."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:120]}" if lines else type(error).__name__


def hub_reachable(timeout=PROBE_TIMEOUT_S):
    """Does the hub (HF_ENDPOINT, any scheme and port) answer within `timeout`? Goes through the proxies that
    requests honours (HTTPS_PROXY, NO_PROXY, ...): on proxy-only clusters a direct connection would fail.
    Any HTTP answer counts; a thread bounds the wait, because a hanging DNS lookup ignores request timeouts."""
    import requests  # here, not above: the loop imports this module for download_folders alone

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    answered = []

    def probe():
        try:
            requests.head(endpoint, timeout=timeout, allow_redirects=False)
            answered.append(True)
        except requests.RequestException:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def load_flash_attention_3():
    """The FA3 module (its flash_attn_func), or None after printing why it is unavailable. Offline, only a kernel
    already in the local cache is used: the run never waits on the network."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # logs, not a terminal
    if os.environ.get("HF_HUB_OFFLINE") != "1" and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from kernels import get_kernel
        return get_kernel(HUB_REPO, version=1)
    except Exception as e:  # whatever the hub, the download or the build raises, training goes on without it
        print(f"Flash Attention 3 unavailable ({first_line(e)}); falling back")
        return None


def could_load(env):
    """Whether a run in `env` could load FA3: an NVIDIA GPU it may see (read without torch). Elsewhere nothing
    downloads the kernel, so a run there needs no write in Hugging Face's cache."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    gpus = "/proc/driver/nvidia/gpus"
    return os.path.exists("/dev/nvidiactl") or (os.path.isdir(gpus) and bool(os.listdir(gpus)))


def download_ports(env):
    """The TCP ports loading FA3 connects to: the hub's (HF_ENDPOINT) and its proxies' (the variables requests
    honours). A confined run may connect to these alone (autoresearch/confine.py)."""
    from urllib.parse import urlsplit

    urls = [env.get("HF_ENDPOINT") or "https://huggingface.co"]
    urls += [env[k] for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
             if env.get(k)]
    ports = set()
    for url in urls:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        try:
            ports.add(parts.port or (443 if parts.scheme == "https" else 80))
        except ValueError:  # a port that is no number: requests cannot use it either
            pass
    return sorted(ports)


def download_folders():
    """Where loading FA3 writes (huggingface_hub's cache, xet's beside it, or KERNELS_CACHE): a confined run
    may write there (autoresearch/confine.py). HF_HOME is made if missing, so that a first run under the loop
    can still download the kernel; nothing the harness measures with lives there."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    try:
        os.makedirs(home, exist_ok=True)
    except OSError:
        pass
    return [home, *(os.environ[k] for k in ("HF_HUB_CACHE", "KERNELS_CACHE") if os.environ.get(k))]
