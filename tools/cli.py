"""The `fastertrt` command line."""

from __future__ import annotations

import argparse
import json
import sys

from fastertrt import __version__
from fastertrt.errors import FastertrtError
from fastertrt.signals import Terminated

EPILOG_COMPILE = """\
examples:
  fastertrt compile minilm -o minilm.bundle            # the shipped MiniLM sentence encoder
  fastertrt compile smollm2 -o smollm2.bundle          # the shipped SmolLM2-135M decoder
  fastertrt compile ./my-bert-folder -o bert.bundle --attn-implementation eager
  fastertrt compile ./my-model -o my.bundle --allow-partial   # fuse what matches, keep the rest as ONNX
  fastertrt compile minilm -o minilm.bundle --backend tensorrt-rtx --precision fp16 --shapes batch=1:8:32,seq=1:128:256
  fastertrt compile minilm -o minilm-int8.bundle --int8 --calib-data my-domain.txt --calib-method entropy
"""
EPILOG_CALIBRATE = """\
examples:
  fastertrt calibrate minilm.bundle                                  # default sample set, max calibrator
  fastertrt calibrate minilm.bundle --data my-domain.txt --method entropy
  fastertrt calibrate minilm.bundle --data samples.jsonl --calib-field body --method percentile --percentile 99.999
  fastertrt calibrate minilm.bundle --exclude 'model.encoder.layer.5.*' && fastertrt build minilm.bundle --precision int8
"""
EPILOG_RUN = """\
examples:
  fastertrt run minilm.bundle --text "TensorRT makes transformers fast." --text "Another sentence."
  fastertrt run minilm.bundle --ids 101,7592,102
  fastertrt run smollm2.bundle --prompt "The capital of France is" --max-new-tokens 16
  fastertrt run smollm2.bundle --prompt "Once upon a time" --num-beams 4 --num-return-sequences 2
  fastertrt run smollm2.bundle --prompt "Hello" --stream
"""
EPILOG_INSPECT = """\
examples:
  fastertrt inspect minilm.bundle
  fastertrt inspect minilm.bundle --json
  fastertrt inspect minilm-int8.bundle --layers          # INT8 or FP32, layer by layer
  fastertrt inspect minilm.bundle --engine-layers        # on a GPU box with the engine's TensorRT

exit status: 1 when a check fails (file hashes, plugin nodes against their ONNX functions).
"""
EPILOG_BENCH = """\
examples:
  fastertrt bench minilm.bundle -o bench-minilm.json
  fastertrt bench smollm2.bundle --new-tokens 32 --repeats 3
  fastertrt bench minilm.bundle --batch 1 --seq 64 --no-torch
  fastertrt bench minilm-int8.bundle --int8-methods all      # + ORT dynamic INT8 (the peer) and each calibrator
  fastertrt bench minilm.bundle --triton --env triton-env -o bench-triton.json   # served vs in process
"""
EPILOG_COMPARE = """\
examples:
  fastertrt compare minilm.bundle                      # torch, model.onnx, fused.onnx, int8.onnx, runtime (+ engine on a GPU)
  fastertrt compare minilm.bundle --text "My own sentence." --json report.json --plot layers.png
  fastertrt compare minilm.bundle --stages fused,int8 --layers all      # error of every layer, passing or not
  fastertrt compare bert.bundle --model ./my-bert-folder                # the torch side from another folder
  fastertrt compare minilm.bundle --save-inputs in.json --save-outputs out.json
  polygraphy run minilm.bundle/int8.onnx --onnxrt --graph-optimization-level ORT_DISABLE_ALL \
      --load-inputs in.json                                             # replay what compare ran
  fastertrt compare minilm.bundle --load-inputs in.json                 # or feed polygraphy's inputs back

exit status: 0 when every stage is within tolerance of its upstream neighbour, 1 when one is not, 2 on bad input.
"""

EPILOG_EXPORT_TRITON = """\
examples:
  fastertrt serve-env triton-env                               # once: numpy<2, onnxruntime, tokenizers
  fastertrt export-triton minilm.bundle -o models --env triton-env
  fastertrt export-triton minilm.bundle -o models --name embed --max-batch 64 --instances 4 --env triton-env
  fastertrt export-triton smollm2.bundle -o models --env triton-env --max-batch 8 --max-beams 4 --max-new-tokens 256
  fastertrt export-triton minilm.bundle -o models --kind gpu --env triton-env   # TensorRT engines, KIND_GPU
  fastertrt serve models --env triton-env                       # or your own tritonserver --model-repository models

per-request caps (config.pbtxt FASTERTRT_MAX_*; a request beyond one gets an error, its batch is served):
  --kind gpu: the engines' optimization profiles; --kind cpu: input tokens up to the model's max length,
  512 new tokens (fewer where the max length is shorter), 8 beams, max(32, --max-batch) rows (prompts x beams).
"""
EPILOG_SERVE = """\
examples:
  fastertrt serve minilm.bundle --env triton-env               # loopback, free ports, until Ctrl-C
  fastertrt serve models --env triton-env --http-port 8000      # an exported repository; gRPC, metrics: free ports
  fastertrt serve smollm2.bundle --env triton-env --max-beams 2 --log /tmp/smollm2-triton.log
  curl -s localhost:8000/v2/models/minilm/infer -d '{"inputs":[{"name":"TEXT","shape":[1,1],"datatype":"BYTES","data":["hello"]}]}'

The server log is kept after it stops (default: SOURCE.tritonserver.log next to SOURCE). Its pid is recorded
under $FASTERTRT_STATE_DIR (default ~/.local/state/fastertrt), so serving the same SOURCE again while it runs
names it. SIGTERM, SIGHUP and Ctrl-C stop it, also while it starts.
"""
EPILOG_SERVE_ENV = """\
examples:
  fastertrt serve-env triton-env            # python -m venv + numpy<2, onnxruntime, tokenizers
  fastertrt serve-env triton-env --gpu      # + cuda-python (install the engine's TensorRT yourself)
"""

EPILOG_SIGN = """\
examples:
  fastertrt sign --new-key team.key                        # team.key (keep it secret) + team.key.pub
  fastertrt sign minilm.bundle --key team.key               # writes minilm.bundle/manifest.sig.json
  fastertrt run minilm.bundle --trusted-key team.key.pub --text "hello"   # refuses unsigned or altered bundles
"""

EPILOG_BUILD = """\
examples:
  fastertrt build minilm.bundle --precision fp16                         # TensorRT-RTX, sm80/86/89, no GPU needed
  fastertrt build minilm.bundle --shapes batch=1:8:32,seq=16:128:256 --targets sm86,sm89
  fastertrt build smollm2.bundle --shapes "batch=1:1:4,seq=1:64:512,past=1:256:1024"
  fastertrt build bert.bundle --backend tensorrt --timing-cache bert.cache   # on a GPU box
"""


def _int_at_least(low: int, what: str):
    """argparse type: an int >= low, or a one-line usage error (exit 2) naming the option's rule."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not {what}")
        return value

    parse.__name__ = what
    return parse


positive_int = _int_at_least(1, "a positive integer (>= 1)")
count_int = _int_at_least(0, "a count (>= 0)")


def port_int(text: str) -> int:
    value = count_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0 picks a free one, else 1..65535)")
    return value


def _add_cap_args(p) -> None:
    """Per-request caps of the Triton model (config.pbtxt FASTERTRT_MAX_*)."""
    g = p.add_argument_group("per-request caps, config.pbtxt FASTERTRT_MAX_* (defaults: see export-triton --help)")
    g.add_argument("--max-input-tokens", type=positive_int, default=None, help="tokens per input row")
    g.add_argument("--max-new-tokens", type=positive_int, default=None, help="decoders: max_new_tokens")
    g.add_argument("--max-beams", type=positive_int, default=None, help="decoders: num_beams")
    g.add_argument("--max-rows", type=positive_int, default=None, help="decoders: prompts x beams in one request")


def _cap_options(args) -> dict:
    return {k: getattr(args, k) for k in ("max_input_tokens", "max_new_tokens", "max_beams", "max_rows")}


def _add_build_args(p, auto: bool) -> None:
    choices = ("auto", "none", "tensorrt-rtx", "tensorrt") if auto else ("tensorrt-rtx", "tensorrt")
    p.add_argument("--backend", choices=choices, default="auto" if auto else "tensorrt-rtx",
                   help="engine builder. " + ("auto: tensorrt if installed, else tensorrt-rtx if installed, else "
                                              "ONNX only; none: ONNX only" if auto else "default tensorrt-rtx"))
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16") + (() if auto else ("int8",)), default=None,
                   help="fp16/bf16 run MatMul/Gemm in that type and keep norms, softmax and reductions FP32"
                        + ("; int8 builds the calibrated int8.onnx (fastertrt calibrate first)" if not auto
                           else " (default fp32; --int8 builds int8)"))
    p.add_argument("--shapes", default=None,
                   help="optimization profile(s): name=min:opt:max over batch, seq, past (';' between profiles; "
                        "decode.seq=... scopes a dim to the decode step)")
    p.add_argument("--targets", default="", help="tensorrt-rtx compute capabilities, e.g. sm80,sm86,sm89 (default)")
    p.add_argument("--opt-level", type=int, default=3, choices=range(0, 6), metavar="0-5",
                   help="builder optimization level (default 3)")
    p.add_argument("--timing-cache", default=None, help="timing cache file, read and updated (standard TensorRT)")


def _add_calibration_args(p, in_compile: bool) -> None:
    data = "--calib-data" if in_compile else "--data"
    p.add_argument(data, dest="calib_data", default=None, metavar="FILE",
                   help="sample data: .txt (one sample a line), .jsonl (text in --calib-field) or .npz (input_ids "
                        "[N, L], attention_mask); default: a built-in English sample set")
    p.add_argument("--calib-field", default="text", help="JSONL field with the text (default: text)")
    method = "--calib-method" if in_compile else "--method"
    p.add_argument(method, dest="calib_method", choices=("max", "percentile", "entropy", "mse"), default="max",
                   help="activation range calibrator (default max)")
    p.add_argument("--percentile", type=float, default=99.999,
                   help="for --method percentile: 99.9, 99.99 or 99.999 (default 99.999)")
    p.add_argument("--smooth-alpha", type=float, default=0.85,
                   help="SmoothQuant migration strength, 0..1 (default 0.85); --no-smooth turns it off")
    p.add_argument("--no-smooth", action="store_true", help="no SmoothQuant scaling of activations")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep matching layers FP32: glob on module path, node or weight name "
                        "(e.g. 'model.encoder.layer.5.*'); repeatable")
    p.add_argument("--max-layer-error", type=float, default=0.05,
                   help="sensitivity pass: layers whose INT8 output error (relative) exceeds this get their full "
                        "range, then FP32 (default 0.05; 0 or less disables)")
    p.add_argument("--calib-batch", type=positive_int, default=16, help="calibration batch size (default 16)")
    p.add_argument("--calib-samples", type=positive_int, default=None, help="use at most this many samples")
    p.add_argument("--fp32-embeddings", action="store_true", help="keep embedding tables FP32 (bigger file)")
    p.add_argument("--calib-cache", default=None, metavar="FILE",
                   help="calibration cache to reuse (default: the bundle's own calibration/cache.json)")


def _calibration_options(args):
    from pathlib import Path

    from fastertrt.calibration.calibrate import CalibrationOptions

    return CalibrationOptions(
        data=Path(args.calib_data) if args.calib_data else None, text_field=args.calib_field,
        method=args.calib_method, percentile=args.percentile,
        smooth_alpha=None if args.no_smooth else args.smooth_alpha, exclude=list(args.exclude),
        max_layer_error=args.max_layer_error if args.max_layer_error > 0 else None, batch_size=args.calib_batch,
        max_samples=args.calib_samples, embeddings=not args.fp32_embeddings,
        cache=Path(args.calib_cache) if args.calib_cache else None)


def _build_options(args):
    import importlib.util

    from fastertrt.compiler.build import BuildOptions
    from fastertrt.runtime.engines import TRT_MODULES

    backend = args.backend
    if backend == "none":
        return None
    if backend == "auto":  # standard TensorRT first: it is listed first
        backend = next((b for b, mod in TRT_MODULES.items() if importlib.util.find_spec(mod)), None)
        if backend is None:
            print("  no TensorRT package installed: the bundle holds ONNX only "
                  "(pip install 'fastertrt[rtx]' to build engines without a GPU)", file=sys.stderr)
            return None
    from pathlib import Path

    precision = args.precision or ("int8" if getattr(args, "int8", False) else "fp32")
    if getattr(args, "int8", False) and args.precision not in (None, "int8"):
        from fastertrt.errors import BuildError

        raise BuildError(f"--int8 builds the INT8 engine; drop --precision {args.precision} or build it afterwards "
                         f"with: fastertrt build BUNDLE --precision {args.precision}")
    return BuildOptions(backend=backend, precision=precision, shapes=args.shapes,
                        targets=[t.strip().lower() for t in args.targets.split(",") if t.strip()],
                        opt_level=args.opt_level, timing_cache=Path(args.timing_cache) if args.timing_cache else None)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastertrt",
        description="Compile PyTorch transformers into deployable bundles (ONNX graphs with fastertrt's plugins, "
                    "INT8 calibration, TensorRT engines), run them without torch, and find where numbers differ.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `fastertrt COMMAND --help` for each command's options and examples.",
    )
    p.add_argument("--version", action="version", version=f"fastertrt {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    c = sub.add_parser("compile", help="export a model to a bundle", epilog=EPILOG_COMPILE, formatter_class=fmt,
                       description="Export a model (shipped name: minilm, smollm2; or a Hugging Face folder) to "
                                   "ONNX with dynamic batch/sequence (and KV cache for decoders), check it "
                                   "against torch on ONNX Runtime, and write a bundle folder.")
    c.add_argument("model", help="shipped model name (minilm, smollm2) or a Hugging Face model folder")
    c.add_argument("-o", "--output", required=True, help="bundle folder to write")
    c.add_argument("--attn-implementation", choices=("sdpa", "eager"), default="sdpa",
                   help="attention implementation to load the torch model with (default: sdpa)")
    c.add_argument("--no-parity", action="store_true", help="skip the ONNX Runtime vs torch check")
    c.add_argument("--allow-partial", action="store_true",
                   help="keep going when some attention blocks match no rule (they stay plain ONNX)")
    c.add_argument("--no-plugins", action="store_true",
                   help="do not replace attention with fastertrt's plugin (the engine uses TensorRT's own)")
    c.add_argument("--force", action="store_true", help="replace the output folder if it holds an earlier fastertrt "
                   "bundle (anything else is refused and left untouched)")
    c.add_argument("--wait", action="store_true", help="if another fastertrt process is writing the output, wait "
                   "for it instead of failing")
    c.add_argument("--int8", action="store_true",
                   help="calibrate INT8 on sample data (explicit Q/DQ): int8.onnx, its ONNX Runtime variant, a "
                        "calibration cache and an accuracy report; the engine is built INT8")
    _add_build_args(c, auto=True)
    _add_calibration_args(c, in_compile=True)
    c.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    bd = sub.add_parser("build", help="(re)build TensorRT engines of a bundle", epilog=EPILOG_BUILD,
                        formatter_class=fmt,
                        description="Build serialized TensorRT engines from a bundle's graphs and add them to the "
                                    "bundle (replacing engines of the same backend and precision). tensorrt-rtx "
                                    "builds ahead of time on a machine with no GPU; tensorrt needs one.")
    bd.add_argument("bundle")
    _add_build_args(bd, auto=False)
    bd.add_argument("--wait", action="store_true", help="if another fastertrt process is writing the bundle, wait "
                    "for it instead of failing")
    bd.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    cb = sub.add_parser("calibrate", help="(re)calibrate INT8 on an existing bundle", epilog=EPILOG_CALIBRATE,
                        formatter_class=fmt,
                        description="Run INT8 calibration on a bundle's fused graph: sample data -> activation "
                                    "ranges (SmoothQuant + a calibrator) -> int8.onnx with Q/DQ for TensorRT, "
                                    "int8.ort.onnx for ONNX Runtime, calibration/cache.json (+ TensorRT's text "
                                    "cache) and calibration/report.json (held-out accuracy vs FP32).")
    cb.add_argument("bundle")
    _add_calibration_args(cb, in_compile=False)
    cb.add_argument("--wait", action="store_true", help="if another fastertrt process is writing the bundle, wait "
                    "for it instead of failing")
    cb.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    r = sub.add_parser("run", help="run a bundle on text or token ids", epilog=EPILOG_RUN, formatter_class=fmt,
                       description="Load a bundle with the thin runtime (no torch) and run it: encoders print "
                                   "embeddings, decoders generate text (greedy or beam search, as transformers' "
                                   "generate(do_sample=False) does).")
    r.add_argument("bundle")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", "--prompt", action="append", dest="text", help="input text (repeat for a batch)")
    src.add_argument("--ids", action="append", help="comma-separated token ids (repeat for a batch)")
    r.add_argument("--max-new-tokens", type=positive_int, default=32, help="decoders: tokens to generate (default 32)")
    r.add_argument("--min-new-tokens", type=count_int, default=0, help="decoders: no eos before this many tokens")
    r.add_argument("--num-beams", type=positive_int, default=1, help="decoders: beam width (default 1: greedy)")
    r.add_argument("--num-return-sequences", type=positive_int, default=1,
                   help="decoders: best beams to print per prompt")
    r.add_argument("--length-penalty", type=float, default=1.0,
                   help="decoders: beam scores are divided by length ** this (default 1.0; < 0 favours short)")
    r.add_argument("--early-stopping", choices=("true", "false", "never"), default="false",
                   help="decoders: when beam search stops (transformers' meaning; default false)")
    r.add_argument("--eos", type=count_int, action="append", default=None, help="decoders: eos token id (repeatable; "
                   "default: the model's)")
    r.add_argument("--stream", action="store_true", help="decoders, greedy: print tokens as they come")
    r.add_argument("--threads", type=positive_int, default=None,
                   help="ONNX Runtime intra-op threads (default: all cores)")
    r.add_argument("--json", action="store_true", help="print the outputs as JSON")
    r.add_argument("--trusted-key", action="append", default=None, metavar="KEY.pub",
                   help="run only if the bundle carries a valid signature by this Ed25519 public key (repeatable; "
                        "fastertrt sign makes keys and signatures)")

    sg = sub.add_parser("sign", help="sign a bundle with an Ed25519 key (or make a key)", epilog=EPILOG_SIGN,
                        formatter_class=fmt, description=(
                            "Loading a bundle means running what its author chose (graphs, engines, cubins). "
                            "A signature over the manifest's sha256 (which covers every file's sha256) lets a "
                            "serving process check who made the bundle: fastertrt run --trusted-key / "
                            "fastertrt.load(..., trusted_keys=[...]) refuse a bundle without a valid signature "
                            "by one of the trusted keys. Needs pip install 'fastertrt[sign]'."))
    sg.add_argument("bundle", nargs="?", help="the bundle to sign")
    sg.add_argument("--key", metavar="KEY", help="Ed25519 private key (PEM) to sign with")
    sg.add_argument("--new-key", metavar="KEY", help="write a new private key to KEY (mode 0600) and its public key "
                    "to KEY.pub, then sign BUNDLE with it if one is given")

    i = sub.add_parser("inspect", help="show what a bundle holds", epilog=EPILOG_INSPECT, formatter_class=fmt,
                       description="Print a bundle's model, graphs (I/O names, dtypes, dynamic dims), stages with "
                                   "sizes, plugin nodes, Q/DQ and per-layer precision, engines with their layers "
                                   "and shape profiles, files, and the checks: manifest, file hashes, plugin "
                                   "nodes against their ONNX functions.")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="print the manifest (and any problems) as JSON")
    i.add_argument("--layers", action="store_true", help="list the precision of every weight layer of the INT8 graph")
    i.add_argument("--engine-layers", action="store_true", help="list each engine's layers with TensorRT's engine "
                   "inspector (needs the engine's TensorRT and a GPU)")

    cp = sub.add_parser("compare", help="find where and why a bundle's numbers differ, stage by stage",
                        epilog=EPILOG_COMPARE, formatter_class=fmt, description=(
                            "Run the same inputs through torch, model.onnx, fused.onnx, int8.onnx, fastertrt's "
                            "runtime and the engine (where a GPU and TensorRT are here) with polygraphy runners; "
                            "compare each stage with its upstream neighbour under fastertrt's tolerance table "
                            "(max abs/rel error and cosine per output); for a failing pair of ONNX stages, mark "
                            "every intermediate tensor on both sides and name the first bad layer: its node, the "
                            "plugin or Q/DQ scale involved, its inputs' statistics and what to do."))
    cp.add_argument("bundle")
    cp.add_argument("--model", default=None, help="the torch model to compare with: shipped name or Hugging Face "
                    "folder (default: the bundle's source)")
    cp.add_argument("--graph", action="append", default=None, help="graph to compare, repeatable (default: all; "
                    "decoders have prefill and decode)")
    cp.add_argument("--stages", default=None, help="comma list from torch,model,fused,int8,runtime,engine "
                    "(default: every stage this machine can run)")
    cp.add_argument("--text", action="append", default=None, help="input text, repeatable: one batch of these "
                    "(default: sample sentences, two ragged batches)")
    cp.add_argument("--load-inputs", default=None, metavar="FILE.json", help="inputs in polygraphy's JSON format")
    cp.add_argument("--save-inputs", default=None, metavar="FILE.json", help="write the inputs (polygraphy's format; "
                    "one file per graph: NAME.GRAPH.json for decoders)")
    cp.add_argument("--save-outputs", default=None, metavar="FILE.json", help="write every stage's outputs "
                    "(polygraphy's RunResults format)")
    cp.add_argument("--layers", choices=("auto", "all", "none"), default="auto", help="first-bad-layer search: "
                    "for failing pairs (auto, default), for every pair of ONNX stages (all), or none")
    cp.add_argument("--max-tokens", type=positive_int, default=64,
                    help="truncate sample inputs to this many tokens (default 64)")
    cp.add_argument("--json", default=None, metavar="FILE", help="write the full report as JSON")
    cp.add_argument("--plot", default=None, metavar="FILE.png", help="write a PNG of the error per layer of each "
                    "layer search")
    cp.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    et = sub.add_parser("export-triton", help="write a Triton Inference Server model repository for a bundle",
                        epilog=EPILOG_EXPORT_TRITON, formatter_class=fmt, description=(
                            "Write a model repository whose model runs fastertrt's runtime in Triton's Python "
                            "backend: config.pbtxt from the manifest (encoders: TEXT or input_ids in, the "
                            "bundle's outputs out; decoders: prompt in, generated text, token ids and scores "
                            "out, generation options as request parameters), dynamic batching, instance "
                            "groups and EXECUTION_ENV_PATH; the bundle and the runtime's sources are copied "
                            "in. A standard-TensorRT engine without fastertrt plugins is also offered on "
                            "Triton's tensorrt_plan platform."))
    et.add_argument("bundle")
    et.add_argument("-o", "--output", required=True, help="repository folder to write")
    et.add_argument("--name", default=None, help="model name (default: the bundle folder's name)")
    et.add_argument("--max-batch", type=positive_int, default=None, help="max_batch_size (default 32; with "
                    "--kind gpu no more than the engines' profiles take)")
    et.add_argument("--instances", type=positive_int, default=2, help="model instances (default 2)")
    et.add_argument("--kind", choices=("cpu", "gpu"), default="cpu", help="cpu: ONNX Runtime; gpu: the bundle's "
                    "TensorRT engines (default cpu)")
    et.add_argument("--env", default=None, help="EXECUTION_ENV_PATH: a venv with numpy<2 and the runtime's "
                    "packages (fastertrt serve-env makes one); default: the python3 first on tritonserver's PATH")
    et.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime threads per instance")
    et.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    _add_cap_args(et)

    sv = sub.add_parser("serve", help="serve a bundle with a local tritonserver", epilog=EPILOG_SERVE,
                        formatter_class=fmt, description=(
                            "Export the bundle to a temporary repository (or take an exported one), start the "
                            "tritonserver that the nvidia-pytriton wheel ships on loopback, wait until it is "
                            "ready, print the endpoints, and stop it cleanly on Ctrl-C."))
    sv.add_argument("source", help="a bundle, or a repository written by export-triton")
    sv.add_argument("--env", default=None, help="the serving environment (see export-triton --env)")
    sv.add_argument("--http-port", type=port_int, default=0, help="HTTP port (default: a free one)")
    sv.add_argument("--grpc-port", type=port_int, default=0, help="gRPC port (default: a free one)")
    sv.add_argument("--metrics-port", type=port_int, default=0, help="metrics port (default: a free one)")
    sv.add_argument("--instances", type=positive_int, default=2, help="model instances when exporting a bundle")
    sv.add_argument("--max-batch", type=positive_int, default=None, help="max_batch_size when exporting a bundle "
                    "(default 32)")
    sv.add_argument("--log", default=None, metavar="FILE", help="tritonserver's log, kept after it stops (default: "
                    "SOURCE.tritonserver.log next to SOURCE)")
    _add_cap_args(sv)

    se = sub.add_parser("serve-env", help="make the Python environment Triton's Python backend runs the model in",
                        epilog=EPILOG_SERVE_ENV, formatter_class=fmt, description=(
                            "Create a venv with numpy<2, onnxruntime and tokenizers (what the runtime needs; "
                            "tritonserver's Python backend misreads inputs under numpy 2) for export-triton "
                            "--env."))
    se.add_argument("path")
    se.add_argument("--gpu", action="store_true", help="also install cuda-python")

    b = sub.add_parser("bench", help="time the bundle against torch", epilog=EPILOG_BENCH, formatter_class=fmt,
                       description="Time torch eager (when installed) and the bundle on ONNX Runtime on the same "
                                   "inputs, each in its own process (for a fair peak RSS): encoder latency per "
                                   "batch size, decoder greedy tokens/s. Prints a table and writes JSON.")
    b.add_argument("bundle")
    b.add_argument("-o", "--output", default=None, help="JSON file to write (default: BUNDLE/../bench-NAME.json)")
    b.add_argument("--batch", type=positive_int, action="append", help="encoder batch sizes (default: 1 and 8)")
    b.add_argument("--seq", type=positive_int, default=128, help="encoder sequence length (default 128)")
    b.add_argument("--new-tokens", type=positive_int, default=32,
                   help="decoder: new tokens per generation (default 32)")
    b.add_argument("--prompt-len", type=positive_int, default=16, help="decoder: prompt tokens (default 16)")
    b.add_argument("--num-beams", type=positive_int, action="append", default=None,
                   help="decoder: beam widths to time, repeatable (default: 1 and 4, i.e. greedy and beam-4)")
    b.add_argument("--repeats", type=positive_int, default=None, help="timed runs (default: 20 encoder, 3 decoder)")
    b.add_argument("--warmup", type=count_int, default=None, help="untimed runs first (default: 3 encoder, 1 decoder)")
    b.add_argument("--threads", type=positive_int, default=None,
                   help="threads for torch and ONNX Runtime (default: all cores)")
    b.add_argument("--no-torch", action="store_true", help="skip the torch rows")
    b.add_argument("--triton", action="store_true", help="encoders: requests/s and p50/p99 latency through a "
                   "local tritonserver at concurrency 1, 8, 32 against the in-process runtime (needs --env)")
    b.add_argument("--env", default=None, help="with --triton: the serving environment (fastertrt serve-env ENV)")
    b.add_argument("--no-int8", action="store_true", help="calibrated bundles: skip the INT8 rows")
    b.add_argument("--int8-methods", default="own",
                   help="calibrated bundles: INT8 rows for 'own' (the bundle's calibration, default), 'all' "
                        "(max, percentile, entropy, mse: each calibrated into a temporary copy) or a comma list")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"compile": _compile, "build": _build, "calibrate": _calibrate, "run": _run, "inspect": _inspect, "bench": _bench,
                    "compare": _compare, "export-triton": _export_triton, "serve": _serve, "serve-env": _serve_env,
                    "sign": _sign}
        return commands[args.command](args)
    except FastertrtError as exc:
        print(f"fastertrt {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:  # SIGTERM/SIGHUP: what was being written is removed on the way out
        print(f"fastertrt {args.command}: {exc}; cleaned up", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _compile(args) -> int:
    from fastertrt.compiler import compile_model
    from fastertrt.progress import Progress

    progress = Progress(enabled=not args.quiet)
    progress.info(f"fastertrt compile {args.model} -> {args.output}")
    compile_model(args.model, args.output, attn_implementation=args.attn_implementation,
                  parity=not args.no_parity, overwrite=args.force, progress=progress, build=_build_options(args),
                  plugins=not args.no_plugins, allow_partial=args.allow_partial,
                  calibration=_calibration_options(args) if args.int8 else None, wait=args.wait)
    return 0


def _calibrate(args) -> int:
    from fastertrt.calibration.calibrate import calibrate_bundle
    from fastertrt.progress import Progress

    progress = Progress(enabled=not args.quiet)
    progress.info(f"fastertrt calibrate {args.bundle} (method {args.calib_method})")
    calibrate_bundle(args.bundle, _calibration_options(args), progress, wait=args.wait)
    progress.info(f"int8.onnx, int8.ort.onnx and calibration/ written into {args.bundle}; build an INT8 engine "
                  f"with: fastertrt build {args.bundle} --precision int8")
    return 0


def _build(args) -> int:
    from fastertrt.compiler.build import build_bundle
    from fastertrt.progress import Progress

    progress = Progress(enabled=not args.quiet)
    progress.info(f"fastertrt build {args.bundle} ({args.backend}, {args.precision or 'fp32'})")
    build_bundle(args.bundle, _build_options(args), progress, wait=args.wait)
    progress.info(f"engines written into {args.bundle}")
    return 0


def _run(args) -> int:
    import numpy as np

    from fastertrt.runtime import Decoder, Encoder, load

    model = load(args.bundle, threads=args.threads, trusted_keys=args.trusted_key)
    if args.text:
        inputs = args.text
    else:
        try:
            inputs = [[int(x) for x in row.replace(" ", "").split(",") if x] for row in args.ids]
        except ValueError as exc:
            from fastertrt.errors import InputError

            raise InputError(f"--ids takes comma-separated integers, e.g. --ids 101,7592,102 ({exc})") from None
    if isinstance(model, Encoder):
        out = model.encode(inputs)
        key = "sentence_embedding" if "sentence_embedding" in out else "last_hidden_state"
        if args.json:
            print(json.dumps({k: v.tolist() for k, v in out.items()}))
            return 0
        for k, v in out.items():
            print(f"{k}: shape {list(v.shape)} dtype {v.dtype}")
        emb = out[key]
        for i, row in enumerate(emb):
            vec = row if row.ndim == 1 else row[0]
            head = ", ".join(f"{x:+.4f}" for x in vec[:6])
            print(f"[{i}] {key}{'' if row.ndim == 1 else '[0]'} = [{head}, ...]  (norm {np.linalg.norm(vec):.4f})")
        return 0
    if isinstance(model, Decoder):
        return _generate(model, args, inputs)
    print("module bundles are run from Python: fastertrt.load(bundle).run(**arrays)", file=sys.stderr)
    return 2


def _generate(model, args, inputs) -> int:
    on_token = None
    if args.stream:
        if args.num_beams != 1:
            from fastertrt.errors import InputError

            raise InputError("--stream prints greedy tokens as they come; beam search knows its text at the end")

        def on_token(step, tokens):
            text = model.tokenizer.decode([int(tokens[0])]) if model.tokenizer else f" {int(tokens[0])}"
            print(text, end="", flush=True)

    early = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    gen = model.generate(inputs, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                         num_beams=args.num_beams, num_return_sequences=args.num_return_sequences,
                         length_penalty=args.length_penalty, early_stopping=early, eos_token_id=args.eos,
                         on_token=on_token)
    if args.stream:
        print()
    if args.json:
        scores = None if gen.scores is None else [float(x) for x in gen.scores]
        print(json.dumps({"new_tokens": gen.new_tokens, "texts": gen.texts, "scores": scores}))
        return 0
    per = args.num_return_sequences
    for i, toks in enumerate(gen.new_tokens):
        if i % per == 0:
            prompt = args.text[i // per] if args.text else args.ids[i // per]
            print(f"[{i // per}] {prompt!s}")
        score = f"  (score {gen.scores[i]:.4f})" if gen.scores is not None and args.num_beams > 1 else ""
        print(f"    -> {gen.texts[i]!r}{score}" if gen.texts else f"    -> ids {toks}{score}")
    return 0


def _inspect(args) -> int:
    from fastertrt.tools.inspect import describe

    text, manifest, problems = describe(args.bundle, layers=args.layers, engine_layers=args.engine_layers)
    print(json.dumps({**manifest, "problems": problems}, indent=2) if args.json else text)
    return 1 if problems else 0


def _export_triton(args) -> int:
    from pathlib import Path

    from fastertrt.serve.repository import TritonOptions, export_repository

    opts = TritonOptions(name=args.name, max_batch=args.max_batch, instances=args.instances, kind=args.kind,
                         env=Path(args.env) if args.env else None, threads=args.threads, **_cap_options(args))
    out = export_repository(args.bundle, args.output, opts, overwrite=args.force)
    print(f"wrote {args.output}: model(s) {', '.join(out['models'])}")
    for note in out["notes"]:
        print(f"note: {note}")
    print(f"serve it: fastertrt serve {args.output}" + (f" --env {args.env}" if args.env else ""))
    return 0


def _serve(args) -> int:
    import tempfile
    from pathlib import Path

    from fastertrt.errors import InputError
    from fastertrt.serve.server import TritonServer, check_not_running
    from fastertrt.signals import terminate_raises

    source = Path(args.source)
    bundle = (source / "manifest.json").is_file()
    if not bundle and not source.is_dir():
        raise InputError(f"{source} is neither a bundle (a folder with manifest.json) nor a model repository "
                         f"folder; give one, e.g. fastertrt serve minilm.bundle --env triton-env")
    check_not_running(source)  # before exporting: the answer does not depend on it
    # SIGTERM/SIGHUP while exporting still clean the temporary repository
    with terminate_raises(), tempfile.TemporaryDirectory(prefix="fastertrt-repo-") as tmp:
        repo, python = _serve_repository(args, source, bundle, Path(tmp) / "models")
        server = TritonServer(repo, source=source, log=Path(args.log) if args.log else None,
                              ports=[args.http_port, args.grpc_port, args.metrics_port])
        if python:
            server.python = python
        return _serve_until_stopped(server)


def _serve_repository(args, source, bundle: bool, tmp):
    """(repository, the environment's Python version or None)."""
    from pathlib import Path

    from fastertrt.serve.repository import TritonOptions, export_repository

    env = Path(args.env) if args.env else None
    if bundle:
        opts = TritonOptions(max_batch=args.max_batch, instances=args.instances, env=env, **_cap_options(args))
        return tmp, export_repository(source, tmp, opts)["python"]
    if any(_cap_options(args).values()):
        print("note: the caps options apply when serving a bundle; a repository keeps those in its config.pbtxt "
              "(export it again with them)", file=sys.stderr)
    if env:
        from fastertrt.serve.environment import check_env

        return source, check_env(env)["python"]
    return source, None


def _serve_until_stopped(server) -> int:
    """0 when stopped by Ctrl-C, SIGTERM or SIGHUP while serving; 128 + the signal
    when interrupted while starting; 1 when the server exits by itself."""
    import signal
    import time

    started = False
    try:
        with server:
            started = True
            print(f"tritonserver (pid {server.pid}) serving {server.repository}\n  HTTP    http://{server.http}\n"
                  f"  gRPC    {server.grpc}\n  metrics http://{server.metrics}/metrics\n"
                  f"  log     {server.log}\nCtrl-C stops it.", flush=True)
            while server.process.poll() is None:
                time.sleep(0.5)
            print(f"tritonserver exited ({server.process.returncode}); its log ({server.log}) ends:\n"
                  f"{server.log_tail()}")
            return 1
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Terminated) else 2
        how = "stopped" if started else "interrupted while starting; stopped"
        print(f"tritonserver {how} ({signal.Signals(signum).name}); log kept at {server.log}", flush=True)
        return 0 if started else 128 + signum


def _sign(args) -> int:
    from fastertrt.bundle.signing import SIGNATURE_NAME, new_key, sign_manifest
    from fastertrt.errors import InputError
    from fastertrt.runtime.manifest import read_manifest, verify_files

    if not args.new_key and not (args.bundle and args.key):
        raise InputError("give a bundle and --key KEY to sign it, or --new-key KEY to make a key "
                         "(e.g. fastertrt sign --new-key team.key)")
    if args.new_key and args.key:
        raise InputError("--key and --new-key exclude each other: sign with an existing key or with a new one")
    key = args.key
    if args.new_key:
        private, public = new_key(args.new_key)
        print(f"wrote {private} (private: keep it secret) and {public} (public: give it to --trusted-key)")
        key = private
    if args.bundle:
        manifest = read_manifest(args.bundle)
        verify_files(args.bundle, manifest)  # never vouch for a damaged bundle
        entry = sign_manifest(args.bundle, manifest, key)
        print(f"signed {args.bundle} (manifest sha256 {manifest['manifest_sha256'][:16]}...) with key "
              f"{entry['key_id']}: {args.bundle}/{SIGNATURE_NAME}")
    return 0


def _serve_env(args) -> int:
    from pathlib import Path

    from fastertrt.serve.environment import make_env

    info = make_env(Path(args.path), gpu=args.gpu)
    print(f"{'kept' if info.get('reused') else 'made'} {args.path}: Python {info['python']}, numpy {info['numpy']}, onnxruntime {info['onnxruntime']}; "
          f"use it with: fastertrt export-triton BUNDLE -o REPO --env {args.path}")
    return 0


def _compare(args) -> int:
    from pathlib import Path

    from fastertrt.progress import Progress
    from fastertrt.tools.compare import CompareOptions, compare_bundle
    from fastertrt.tools.compare.report import plot, text, write_json

    opts = CompareOptions(graphs=args.graph, stages=args.stages.split(",") if args.stages else None,
                          texts=args.text, load_inputs=args.load_inputs and Path(args.load_inputs),
                          save_inputs=args.save_inputs and Path(args.save_inputs),
                          save_outputs=args.save_outputs and Path(args.save_outputs), model=args.model,
                          layers=args.layers, max_tokens=args.max_tokens)
    report = compare_bundle(args.bundle, opts, Progress(enabled=not args.quiet))
    print(text(report))
    if args.json:
        write_json(report, Path(args.json))
        print(f"wrote {args.json}")
    if args.plot:
        if any(g["layers"] for g in report["graphs"]):
            panels = plot(report, Path(args.plot))
            print(f"wrote {args.plot} ({panels} layer search(es))")
        else:
            print(f"no layer search ran (every pair passed), so no {args.plot}; --layers all plots every pair")
    return 0 if report["passed"] else 1


def _bench(args) -> int:
    from pathlib import Path

    if args.triton:
        from fastertrt.tools.bench_triton import run_triton_bench

        if not args.env:
            from fastertrt.errors import InputError

            raise InputError("bench --triton needs the serving environment: --env ENV (fastertrt serve-env ENV)")
        try:
            run_triton_bench(Path(args.bundle), Path(args.env), threads=args.threads,
                             output=Path(args.output) if args.output else None)
        except Terminated as exc:  # the server was stopped on the way out
            print(f"bench --triton stopped by {exc}", file=sys.stderr)
            return 128 + exc.signum
        return 0
    from fastertrt.tools.bench import run_bench

    run_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
