"""The worker's Prometheus metrics, served on a port of its own (`SDSERVE_METRICS_PORT`).

One process per GPU, no multiprocess mode. Names follow Prometheus conventions: `sdserve_worker_`
prefix, base units, counters end in `_total` (prometheus_client adds it).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from app.jobs.contract import JOB_SECONDS_BUCKETS, ErrorCode

# Seconds a step or a decode takes: milliseconds on a GPU, up to seconds on a CPU.
STEP_SECONDS_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

# The phases of a continuous-batching step, in order (worker/continuous.py).
LOOP_PHASES = ("take", "join", "step", "deliver")
JOIN_PARTS = ("inputs", "prompts", "room")  # where a join wait goes (RowLoop._join)


class WorkerMetrics:
    def __init__(self, row_buckets: list[int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_wait = Histogram(
            "sdserve_worker_queue_wait_seconds",
            "Accepted to taken by a worker, by model.",
            ["model"],
            buckets=JOB_SECONDS_BUCKETS,
            registry=r,
        )
        self.vae_decode = Histogram(
            "sdserve_worker_vae_decode_seconds",
            "VAE decode of a batch's images.",
            buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        )
        self.vae_encode = Histogram(
            "sdserve_worker_vae_encode_seconds",
            "VAE encode of a job's source picture (img2img, inpainting, upscaling, a pixel hires"
            " fix), on the GPU.",
            buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        )
        self.png_encode = Histogram(
            "sdserve_worker_png_encode_seconds",
            "Encoding one PNG.",
            buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "sdserve_worker_images", "Images generated and stored, by model.", ["model"], registry=r
        )
        self.failures = Counter(
            "sdserve_worker_failures", "Jobs failed, by error code.", ["code"], registry=r
        )
        for code in ErrorCode:  # every code at 0 from the start: rates need no first failure
            self.failures.labels(code.value)
        self.oom_splits = Counter(
            "sdserve_worker_oom_splits", "Batches split in two after running out of GPU memory.",
            registry=r,
        )  # fmt: skip
        self.recompiles = Counter(
            "sdserve_worker_recompiles",
            "Compiled calls that would have compiled while serving (a guard the warm-up did not"
            " cover failed); each ran eagerly instead. Should stay 0.",
            registry=r,
        )
        self.cudagraph_skips = Gauge(
            "sdserve_worker_cudagraph_skips",
            "Compiled calls that CUDA graphs could not capture since the worker started; each ran"
            " without them, slower (TORCH_LOGS=cudagraphs says why). Should stay 0.",
            registry=r,
        )
        self.warm_entries_left = Gauge(
            "sdserve_worker_warm_entries_left",
            "Warm-up entries the start left for idle time (CUDA graph recordings of the"
            " middle row buckets and longer prompts; none compiles): the loop records one"
            " whenever it has no rows. 0 once the worker is fully warm.",
            registry=r,
        )
        self.model_load = Gauge(
            "sdserve_worker_model_load_seconds", "Time to load the model at start.", registry=r
        )
        self.warm_up = Gauge(
            "sdserve_worker_warm_up_seconds",
            "Time to warm up at start (compilation included).",
            registry=r,
        )
        self.gpu_memory = Gauge(
            "sdserve_worker_gpu_memory_bytes", "GPU memory allocated now.", registry=r
        )
        self.gpu_memory_peak = Gauge(
            "sdserve_worker_gpu_memory_peak_bytes",
            "Most GPU memory allocated since start.",
            registry=r,
        )
        self.last_heartbeat = Gauge(
            "sdserve_worker_last_heartbeat_timestamp_seconds",
            "When the worker last told Redis it lives (Unix time).",
            registry=r,
        )
        self.rows_in_flight = Gauge(
            "sdserve_worker_rows_in_flight",
            "Images being denoised now (continuous batching).",
            registry=r,
        )
        self.gpu_lead_wait = Counter(
            "sdserve_worker_gpu_lead_wait_seconds",
            "Host seconds the loop's thread waited for the GPU to catch up to the call it"
            " launched RUN_AHEAD calls back (worker/timing.py Lead): the rest of its step"
            " phase is its own work.",
            registry=r,
        )
        self.take_ahead = Gauge(
            "sdserve_worker_take_ahead_calls",
            "How many UNet calls before their room frees jobs are taken: what jobs took to be"
            " ready to join (inputs, LoRAs, prompts) against a call (continuous batching).",
            registry=r,
        )
        self.row_step = Histogram(
            "sdserve_worker_row_step_seconds",
            "One step of continuous batching (its UNet call, with its rows' ControlNet forwards),"
            " by its row bucket (the rows, rounded up to a bucket; compiled calls are padded to"
            " it).",
            ["bucket"],
            buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        )
        self.unet_rows = Counter(
            "sdserve_worker_unet_rows",
            "UNet rows computed (continuous batching), by kind: real or padding.",
            ["kind"],
            registry=r,
        )
        # Every series exists from the start (at zero), in either batching mode: a scrape
        # always shows the same families, and rates start from a known zero.
        for bucket in row_buckets:
            self.row_step.labels(str(bucket))
        for kind in ("real", "padding"):
            self.unet_rows.labels(kind)
        self.join_wait = Histogram(
            "sdserve_worker_join_wait_seconds",
            "Taken from the queue to joined the rows in flight (continuous batching).",
            buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        )
        self.join_wait_parts = Counter(
            "sdserve_worker_join_wait_parts_seconds",
            "The join wait (taken to joined) in its parts, summed over jobs: inputs (its picture,"
            " control images read, its LoRAs made resident), prompts (read after those), room"
            " (then waiting for room or its turn in flight).",
            ["part"],
            registry=r,
        )
        for part in JOIN_PARTS:
            self.join_wait_parts.labels(part)
        self.loop_seconds = Counter(
            "sdserve_worker_loop_seconds",
            "Host seconds the loop's thread spent in each phase of its steps (continuous"
            " batching): take (the queue, starting jobs), join (jobs' first latents: encodes,"
            " noise), step (UNet calls, and the decodes of jobs whose last step it was), deliver"
            " (finished decodes handed on). Waits for the GPU count in the phase that waits.",
            ["phase"],
            registry=r,
        )
        for phase in LOOP_PHASES:
            self.loop_seconds.labels(phase)
        self.completion_backlog = Gauge(
            "sdserve_worker_completion_backlog",
            "Jobs whose images wait to be encoded and stored (bounded: the GPU waits when full).",
            registry=r,
        )
        self.storage_retries = Counter(
            "sdserve_worker_storage_retries", "Image writes to storage tried again.", registry=r
        )
        self.lora_uses = Counter(
            "sdserve_worker_lora_uses",
            "LoRAs a job asked for: on the GPU already (hit), or read from their file (miss).",
            ["result"],
            registry=r,
        )
        for result in ("hit", "miss"):  # shown from the start, at 0
            self.lora_uses.labels(result)
        self.lora_load = Histogram(
            "sdserve_worker_lora_load_seconds",
            "Time to read a LoRA's file and write it into the GPU's pools (off the GPU loop).",
            buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30),
            registry=r,
        )
        self.loras_resident = Gauge(
            "sdserve_worker_loras_resident", "LoRAs on the GPU, all models.", registry=r
        )

    # The engine reports its timings here (see worker.engine.Observer).
    def stepped(self, seconds: float, rows: int, bucket: int, padding: int) -> None:
        self.row_step.labels(str(bucket)).observe(seconds)
        self.unet_rows.labels("real").inc(rows)
        self.unet_rows.labels("padding").inc(padding)

    def decoded(self, seconds: float) -> None:
        self.vae_decode.observe(seconds)

    def encoded(self, seconds: float) -> None:
        self.vae_encode.observe(seconds)

    def waited(self, seconds: float) -> None:
        self.gpu_lead_wait.inc(seconds)

    # Each model's LoRAs report here (see worker.adapters.LoraObserver).
    def lora_used(self, hit: bool) -> None:
        self.lora_uses.labels("hit" if hit else "miss").inc()

    def lora_loaded(self, seconds: float) -> None:
        self.lora_load.observe(seconds)

    def serve(self, port: int) -> None:
        """Serve /metrics on `port` in a background thread."""
        start_http_server(port, registry=self.registry)
