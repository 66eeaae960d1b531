"""TensorFlow side of ``python attention.py --framework tf``: tensors, gradients, timing, memory.

Same interface as the script's ``TorchRunner``: ``tensor``, ``numpy``, ``forward_backward``,
``time_forward`` (median milliseconds of a ``tf.function``-compiled forward pass) and
``peak_memory`` (bytes: TensorFlow's allocator peak on the device).
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class TFRunner:
    name = "tf"

    def __init__(self, device: str | None):
        gpus = tf.config.list_logical_devices("GPU")
        if device is None:
            device = "GPU:0" if gpus else "CPU:0"
        elif device.startswith("cuda"):
            # the torch spelling of the script's --device
            device = "GPU:" + (device.split(":")[1] if ":" in device else "0")
        self.device = device.upper()
        if self.device.startswith("GPU") and not gpus:
            raise SystemExit(f"--device {device}: TensorFlow sees no GPU; use --device cpu")

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("GPU")

    def describe(self) -> str:
        where = "CPU"
        if self.on_gpu:
            details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
            where = details.get("device_name", self.device)
        return f"TensorFlow {tf.__version__} on {where}"

    def tensor(self, x: np.ndarray, dtype: str, grad: bool = True):
        # grad is the torch runner's requires_grad; tf tensors are watched by the tape instead
        with tf.device(self.device):
            return tf.cast(tf.constant(x), getattr(tf, dtype))

    def numpy(self, x) -> np.ndarray:
        return tf.cast(x, tf.float64).numpy()

    def _grads(self, fn, q, k, v, dout):
        with tf.device(self.device), tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = fn(q, k, v)
        return out, tape.gradient(out, [q, k, v], output_gradients=dout)

    def forward_backward(self, fn, q, k, v, dout):
        out, grads = self._grads(fn, q, k, v, dout)
        return self.numpy(out), [self.numpy(g) for g in grads]

    def sync(self):
        # eager results are materialised by .numpy(); nothing is queued between calls
        return None

    def time_forward(self, fn, q, k, v, reps: int) -> float:
        compiled = tf.function(fn, autograph=False)
        with tf.device(self.device):
            compiled(q, k, v).numpy()  # trace and warm up
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                compiled(q, k, v).numpy()
                times.append(time.perf_counter() - t0)
        return float(np.median(times)) * 1e3

    def peak_memory(self, fn, q, k, v, dout) -> int | None:
        """Peak memory of one eager forward + backward, in bytes: TensorFlow's allocator peak on
        the device (CPU included); the growth of the peak RSS where the allocator keeps no stats."""
        try:
            tf.config.experimental.reset_memory_stats(self.device)
            base = tf.config.experimental.get_memory_info(self.device)["current"]
        except (ValueError, RuntimeError, tf.errors.OpError):
            return self._peak_rss(fn, q, k, v, dout)
        _, grads = self._grads(fn, q, k, v, dout)
        _ = [g.numpy() for g in grads]
        return tf.config.experimental.get_memory_info(self.device)["peak"] - base

    def _peak_rss(self, fn, q, k, v, dout) -> int | None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark VmHWM to the current RSS
        except OSError:
            return None
        base = _proc_status_bytes("VmRSS:")
        _, grads = self._grads(fn, q, k, v, dout)
        _ = [g.numpy() for g in grads]
        peak = _proc_status_bytes("VmHWM:")
        return None if base is None or peak is None else peak - base
