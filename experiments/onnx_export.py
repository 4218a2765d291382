"""ONNX export of every architecture's uncached forward (logits), run with onnxruntime against PyTorch.

Each tiny random model of bench/scale_out.py (2 layers, 64 wide, new modules opened) in eval mode is exported with
`torch.onnx.export(..., dynamo=True)` (torch.export underneath) with batch and sequence length dynamic, then run by
onnxruntime on an input of another batch and length, with left padding; the figure is max |ONNX logits - PyTorch
logits| over the real tokens (a causal LM's logits at padding positions mean nothing; Bridged: every decoder token). Needs `pip install onnx onnxscript onnxruntime`. No KV cache: decoding through ONNX would recompute the
prefix at every step.

    python experiments/onnx_export.py [--json onnx_export.json]
"""

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from scale_out import ARCHS, VOCAB, build  # noqa: E402  (the same tiny models as the scale-out check)


class Logits(torch.nn.Module):
    """The model's uncached forward as a function of tensors only: (input ids, mask[, decoder ids]) -> logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids=None):
        extra = {} if decoder_input_ids is None else {"decoder_input_ids": decoder_input_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits


def inputs(arch, batch, length, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding on the first row
    args = [ids, mask]
    if arch == "bridge":
        args.append(torch.randint(1, VOCAB, (batch, length - 2), generator=generator))
    return tuple(args)


def check(arch, folder):
    import onnxruntime

    model = Logits(build(arch).eval())
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=4, max=64)
    shapes = [{0: batch, 1: seq}, {0: batch, 1: seq}]
    if arch == "bridge":
        shapes.append({0: batch, 1: torch.export.Dim("target", min=2, max=64)})
    path = Path(folder) / f"{arch}.onnx"
    start = time.time()
    torch.onnx.export(model, inputs(arch, 2, 12, 0), str(path), dynamo=True, dynamic_shapes=tuple(shapes),
                      input_names=["input_ids", "attention_mask", "decoder_input_ids"][:len(shapes)])
    seconds = time.time() - start
    probe = inputs(arch, 3, 20, 1)  # another batch size and length than the export saw
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), probe)}
    (onnx_logits,) = session.run(None, feeds)
    with torch.no_grad():
        torch_logits = model(*probe)
    diff = (torch.from_numpy(onnx_logits) - torch_logits).abs()
    if arch != "bridge":  # a causal LM's logits at left-padding positions are meaningless: compare the real tokens
        diff = diff[probe[1].bool()]
    diff = diff.max().item()
    return {"max_abs_diff": diff, "export_seconds": round(seconds, 1), "shape": list(onnx_logits.shape)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--json", default="onnx_export.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.archs:
            try:
                results[arch] = check(arch, folder)
            except Exception as error:
                first_line = str(error).splitlines()[0] if str(error) else ""
                results[arch] = {"error": f"{type(error).__name__}: {first_line}"[:300],
                                 "traceback": traceback.format_exc()[-4000:]}
    Path(args.json).write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))
    for arch, result in results.items():
        figure = f"max |Δ logits| {result['max_abs_diff']:.1e}" if "max_abs_diff" in result else result["error"]
        print(f"{arch}: {figure}")
    return 0 if all("max_abs_diff" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
