"""Context-parallel plans (`cp_plan`) for the families whose diffusers model has none.

diffusers' `enable_parallelism` splits a model's inputs and gathers its output where the model's `_cp_plan` says.
Wan, LTX-Video and Flux ship one; for CogVideoX and HunyuanVideo dit-sparse supplies it here. HunyuanVideo's text
is padded, with a mask built from the whole text: its plan splits only the video and leaves the text whole on every
rank (parallel/attention.py attends it so).

    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2),
                                   cp_plan=dit_sparse.context_parallel_plan(transformer))
"""

from __future__ import annotations

from typing import Callable

from .topology import UnsupportedParallelismError


def _cogvideox_plan() -> dict:
    """Text and video are split where they enter the first block (text first, as CogVideoX orders them) and flow on
    split; the rotary tables, which every block receives from the transformer, are split at every block; the video
    is gathered after the last block's output projection."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return {
        "transformer_blocks.0": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
            "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
        },
        "transformer_blocks.*": {
            "image_rotary_emb": [ContextParallelInput(split_dim=0, expected_dims=2)] * 2,
        },
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def _hunyuan_video_plan() -> dict:
    """The video is split as it leaves the patch embedding (the attention mask the model builds after it then covers
    [this rank's video, all text]), the rotary tables as the model makes them, and the video gathered after the
    output projection. The text (through the token refiner and every block) stays whole on every rank."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return {
        "x_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "rope": {0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
                 1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


SUPPLIED_PLANS: dict[str, Callable[[], dict]] = {
    "CogVideoXTransformer3DModel": _cogvideox_plan,
    "HunyuanVideoTransformer3DModel": _hunyuan_video_plan,
}


def context_parallel_plan(transformer) -> dict:
    """The cp_plan to give `enable_parallelism` for this transformer: its own, or the one dit-sparse supplies.
    Raises UnsupportedParallelismError, naming the model, where there is neither."""
    name = type(transformer).__name__
    for cls in type(transformer).__mro__:
        if cls.__name__ in SUPPLIED_PLANS:
            return SUPPLIED_PLANS[cls.__name__]()
    own = getattr(transformer, "_cp_plan", None)
    if own is None:
        raise UnsupportedParallelismError(
            f"{name} has no context-parallel plan, in diffusers or in dit-sparse; models that have one: Wan, "
            f"LTX-Video, Flux (diffusers), {', '.join(SUPPLIED_PLANS)} (dit-sparse)")
    return own
