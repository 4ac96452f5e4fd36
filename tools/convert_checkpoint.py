#!/usr/bin/env python3
"""Converts a PyTorch checkpoint (`pytorch_model.bin`: NT-v2, Enformer, IsoFormer) to safetensors for
isoformer-engine.

- Enformer's duplicate `_trunk.*` aliases are dropped (the named modules hold the same tensors), as are
  BatchNorm `num_batches_tracked` counters.
- Tied or shared tensors are cloned, so every tensor owns its storage (safetensors refuses shared ones).
- With --config, the config.json is copied beside the weights, giving the directory layout `embed --weights`
  takes (config.json + model.safetensors).

Usage:
  convert_checkpoint.py pytorch_model.bin OUT_DIR [--config config.json]
  convert_checkpoint.py --export-tf-gammas OUT.safetensors     (enformer-pytorch's TF gamma table, [3071, 32])

Needs torch and safetensors (e.g. the .venv-ref of tools/make_fixtures.py); writes atomically.
"""
import argparse
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file


def atomic_save(tensors, path, metadata=None):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".partial")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def convert(state):
    names = set(state)
    out = {}
    for name, tensor in state.items():
        if not torch.is_tensor(tensor) or name.endswith("num_batches_tracked"):
            continue
        if name.startswith("_trunk.") or "._trunk." in name:
            continue  # an alias of stem./conv_tower./transformer./final_pointwise.
        out[name] = tensor.detach().to("cpu").clone().contiguous()
    dropped = sorted(names - set(out))
    return out, dropped


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("out_dir", nargs="?")
    ap.add_argument("--config")
    ap.add_argument("--export-tf-gammas", metavar="OUT")
    args = ap.parse_args()
    if args.export_tf_gammas:
        from enformer_pytorch.modeling_enformer import TF_GAMMAS

        atomic_save({"tf_gammas": TF_GAMMAS.float().contiguous()}, args.export_tf_gammas)
        print(f"wrote {args.export_tf_gammas} {list(TF_GAMMAS.shape)}")
        return
    if not args.checkpoint or not args.out_dir:
        ap.error("give CHECKPOINT and OUT_DIR")
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    tensors, dropped = convert(state)
    os.makedirs(args.out_dir, exist_ok=True)
    atomic_save(tensors, os.path.join(args.out_dir, "model.safetensors"), {"format": "pt"})
    if args.config:
        shutil.copy(args.config, os.path.join(args.out_dir, "config.json"))
    print(f"wrote {len(tensors)} tensors to {args.out_dir}/model.safetensors; dropped {len(dropped)} "
          f"(aliases and counters){': ' + ', '.join(dropped[:5]) + ' …' if dropped else ''}")


if __name__ == "__main__":
    main()
