"""Peak anonymous memory of the TensorRT-RTX builder for one ONNX graph, per builder-flag variant (issue 14: why
the 8B build does not fit 24 GiB). The graph is parsed as `build_tensorrt` does (weights as mapped initializers);
a thread samples RssAnon/VmRSS every 0.1 s. One process per variant:

    python benchmarks/trt_builder_memory.py BUILD/onnx/target_step.onnx default|strip|refit|strip_refit OUT.json
"""

import json
import sys
import threading
import time
from pathlib import Path

import tensorrt_rtx_bindings as trt

from dspark_compile.targets.tensorrt.build import _build_to_file, _map_weights

FLAGS = {"default": (), "strip": ("STRIP_PLAN", "REFIT_IDENTICAL"), "refit": ("REFIT",),
         "strip_refit": ("STRIP_PLAN", "REFIT")}


class Sampler(threading.Thread):
    """Largest RssAnon and VmRSS of this process while it runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"anon": 0, "rss": 0}
        self.stop = False

    @staticmethod
    def now() -> dict[str, int]:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    def run(self) -> None:
        while not self.stop:
            d = self.now()
            self.peak = {"anon": max(self.peak["anon"], d["RssAnon"]), "rss": max(self.peak["rss"], d["VmRSS"])}
            time.sleep(0.1)


class Quiet(trt.ILogger):  # type: ignore[misc]
    def __init__(self) -> None:
        trt.ILogger.__init__(self)

    def log(self, severity: object, msg: str) -> None:
        pass


def main(onnx_path: Path, variant: str, out: Path) -> None:
    sampler = Sampler()
    sampler.start()
    builder = trt.Builder(Quiet())
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, Quiet())
    t0 = time.time()
    w = _map_weights(onnx_path)
    assert w is not None, "the graph keeps its weights inside the file"
    ok = parser.load_model_proto(w.graph, str(onnx_path)) and all(
        parser.load_initializer(n, a, s) for n, (a, s) in w.initializers.items()) and parser.parse_model_proto()
    assert ok, [parser.get_error(i).desc() for i in range(parser.num_errors)]
    time.sleep(0.3)
    after_parse = dict(sampler.peak)
    config = builder.create_builder_config()
    for flag in FLAGS[variant]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()  # smallest shapes: the weights dominate the memory
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if any(d < 0 for d in t.shape):
            dims = [d if d >= 0 else 1 for d in t.shape]
            profile.set_shape(t.name, dims, dims, dims)
    config.add_optimization_profile(profile)
    plan = out.with_suffix(f".{variant}.plan")
    built = _build_to_file(trt, builder, network, config, plan)
    sampler.stop = True
    time.sleep(0.2)
    res = {"variant": variant, "flags": FLAGS[variant], "built": built, "seconds": time.time() - t0,
           "weights_bytes": sum(s for _, s in w.initializers.values()), "peak_anon": sampler.peak["anon"],
           "peak_rss": sampler.peak["rss"], "stages": {"after_parse": after_parse},
           "plan_bytes": plan.stat().st_size if plan.exists() else None}
    print(json.dumps(res))
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
