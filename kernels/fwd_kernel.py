"""Triton forward kernel: block-sparse flash attention over a BlockLayout, with pooled levels and optional FP8.

One program computes BLOCK_M query rows of one (batch, head). It runs one online softmax (base 2, fp32) over
  1. the full-resolution key tiles of its query block: a flat loop over ``count * BLOCK_K / BLOCK_N`` tiles
     without masks, each tile's key-block id read from the look-up table one tile ahead; when S is not a whole
     number of key blocks (EVEN_N off) the tile straddling S is peeled off the loop and runs masked after it,
     and tiles wholly past S are skipped (this relies on the layout's ascending key blocks). With DESC (on for
     sm_90) k and v are read through tensor descriptors (TMA), whose bounds zero-fill rows past S;
  2. the pooled key segments (HAS_POOL): row ranges of the pooled tensor, each pooled key carrying +ln(n).
It writes the normalised output and the natural-log LSE of every row.

FP8 (e4m3): q and k arrive quantized with one scale per row (the per-tile scales expanded to rows); scores are
``dot(q8, k8) * q_scale * k_scale`` on FP8 tensor cores. Full-resolution keys must share one scale per key block
(``fp8_quant`` quantizes them per block_k tile), so the loop reads one scale per tile; pooled rows are read per
row. v is quantized per channel. By default it arrives dequantized in 16 bits and P.V runs in 16 bits, which
reproduces ``dit_sparse.fp8`` (the numerics plans are calibrated with) exactly. With FP8_PV, v arrives as fp8 and
P is rescaled into e4m3 range (x 448, since p <= 1 after subtracting the running max) for an FP8 second dot: FP8
speed on both products for the extra rounding of P (0.1-4 dB less SQNR in the interpreter, whose fp8 cast is
cruder than the GPU's). Accumulation is fp32 throughout. Head dims are powers of two (the public function pads others).

Address arithmetic runs in int64 (program ids are cast first): B * S * H * D exceeds 2**31 on long videos.
"""

from __future__ import annotations

from ._triton import LazyKernel, tl

LOG2E = 1.4426950408889634


def _program_rows(H, S, BLOCK_ROWS: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, BLOCK_OTHER: tl.constexpr,
                  HEAD_DIM: tl.constexpr):
    """Where a program of a (row tiles, batch x head) grid works: (batch, head, the layout block of its rows, its
    BLOCK_ROWS rows, the head-dim offsets, the offsets within a tile of the other side, which of its rows are < S).
    Shared by the forward (query rows), dk/dv (key rows) and dq (query rows) kernels."""
    pid = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    block = (pid * BLOCK_ROWS) // LAYOUT_BLOCK
    return pid_bh // H, pid_bh % H, block, rows, tl.arange(0, HEAD_DIM), tl.arange(0, BLOCK_OTHER), rows < S


def _load_rows(base, rows, stride, offs_d, ok):
    """The (rows, D) tile of one (batch, head)'s (S, D) slice at ``base``; rows not ``ok`` read as zeros."""
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=ok[:, None], other=0.0)


def _store_rows(base, rows, stride, offs_d, ok, value):
    """``value`` (rows, D) into one (batch, head)'s (S, D) slice at ``base``, in its dtype; rows not ``ok`` are not
    written."""
    tl.store(base + rows[:, None] * stride + offs_d[None, :], value.to(base.dtype.element_ty), mask=ok[:, None])


def _peel_ragged_block(lut, count, sik, S, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """(tiles of the unmasked loop, whether the row's last entry is the ragged key block, that entry). Entries
    ascend, so only the last one can be the ragged block: its tiles wholly inside S join the unmasked loop, the one
    straddling S runs masked after it, and those wholly past S are skipped. Shared by the forward and dq kernels."""
    TILES: tl.constexpr = BLOCK_K // BLOCK_N
    last = tl.load(lut + (count - 1) * sik, mask=count > 0, other=0)
    ragged = (count > 0) & (last == (S - 1) // BLOCK_K)
    return count * TILES - tl.where(ragged, TILES - (S % BLOCK_K) // BLOCK_N, 0), ragged, last


def _key_tile(acc, l_i, m_i, q, s_scale, k_base, v_base, k_desc, v_desc, first, offs_n, offs_d, S,
              sks, svs, svd, MASKED: tl.constexpr, FP8_PV: tl.constexpr, IEEE: tl.constexpr, DESC: tl.constexpr):
    """One full-resolution key tile (rows first .. first + BLOCK_N) into the online softmax; only the tile
    straddling S is MASKED. s_scale: the softmax scale in log2 units, a scalar or (BLOCK_M, 1) under FP8."""
    rows = first + offs_n
    n_ok = rows < S
    if DESC:
        kt = tl.trans(k_desc.load([first.to(tl.int32), 0]))
    elif MASKED:
        kt = tl.load(k_base + rows[None, :] * sks + offs_d[:, None], mask=n_ok[None, :], other=0.0)
    else:
        # k is read transposed, (D, N), so the first dot needs no tl.trans.
        kt = tl.load(k_base + rows[None, :] * sks + offs_d[:, None])
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee") * s_scale
    else:
        s = tl.dot(q, kt) * s_scale
    if MASKED:
        # An additive -inf per padded column fuses with the scale multiply into one FMA.
        s += tl.where(n_ok, 0.0, float("-inf"))[None, :]
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DESC:
        v = v_desc.load([first.to(tl.int32), 0])
    elif MASKED and not FP8_PV:
        v = tl.load(v_base + rows[:, None] * svs + offs_d[None, :] * svd, mask=n_ok[:, None], other=0.0)
    else:
        # FP8 v is sequence-contiguous and padded past its last row (fp8_quant), so it is read unmasked: a
        # mask along the contiguous axis would keep the load out of the asynchronous copy pipeline.
        v = tl.load(v_base + rows[:, None] * svs + offs_d[None, :] * svd)
    return _accumulate_pv(acc, p, v, FP8_PV, IEEE), l_i, m_new


def _accumulate_pv(acc, p, v, FP8_PV: tl.constexpr, IEEE: tl.constexpr):
    """acc + P.V in the variant's precision (full-resolution tiles and pooled segments alike)."""
    if FP8_PV:
        # Accumulating inside the dot keeps the FP8 MMA asynchronous; `acc += dot` waits for it every tile.
        return tl.dot((p * 448.0).to(v.dtype), v, acc)
    if IEEE:
        return acc + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc + tl.dot(p.to(v.dtype), v)


def _block_sparse_fwd(
    Q, K, V, KP, VP, BIAS, QS, KS, VS,
    KV_INDEX, KV_COUNT, P_START, P_LEN, P_COUNT,
    OUT, LSE,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, svd,
    spkb, spks, spkh, spvb, spvs, spvh, spvd,
    sob, sos, soh,
    sib, sih, sin, sik, scb, sch, scn,
    spb, sph, spn, spk, spcb, spch, spcn,
    S, S_POOL, H, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_POOL: tl.constexpr, FP8: tl.constexpr, FP8_PV: tl.constexpr, EVEN_N: tl.constexpr, IEEE: tl.constexpr,
    DESC: tl.constexpr,
):
    b, h, q_block, offs_m, offs_d, offs_n, m_ok = _program_rows(H, S, BLOCK_M, BLOCK_Q, BLOCK_N, HEAD_DIM)
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqs, offs_d, m_ok)
    if FP8:
        # The query scale folds into the softmax scale per row.
        row_scale = tl.load(QS + (b * H + h) * S + offs_m, mask=m_ok, other=0.0) * qk_scale
        ks_base = KS + (b * H + h) * (S + S_POOL)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # 1. Full-resolution key blocks: one flat loop over tiles, then the ragged tile peeled off.
    TILES: tl.constexpr = BLOCK_K // BLOCK_N
    lut = KV_INDEX + b * sib + h * sih + q_block * sin
    count = tl.load(KV_COUNT + b * scb + h * sch + q_block * scn)
    n_tiles = count * TILES
    if not EVEN_N:
        n_tiles, ragged, last = _peel_ragged_block(lut, count, sik, S, BLOCK_K, BLOCK_N)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    k_desc = k_base
    v_desc = v_base
    if DESC:
        # Rows past S read as zeros (the descriptor's bounds), so the ragged tile needs no load mask either.
        k_desc = tl.make_tensor_descriptor(k_base, [S, HEAD_DIM], [sks, 1], [BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, [S, HEAD_DIM], [svs, 1], [BLOCK_N, HEAD_DIM])
    # The block id is read one tile ahead, so no K/V load waits behind a dependent table load.
    block_next = tl.load(lut, mask=n_tiles > 0, other=0)
    for t in range(0, n_tiles):
        block = block_next.to(tl.int64)
        block_next = tl.load(lut + ((t + 1) // TILES) * sik, mask=t + 1 < n_tiles, other=0)
        first = block * BLOCK_K + (t % TILES) * BLOCK_N
        s_scale = qk_scale
        if FP8:
            # Keys are quantized per key block, so the tile's rows share one scale: a scalar, where a vector of
            # per-row scales would need a layout conversion (and a barrier) in this loop.
            s_scale = (row_scale * tl.load(ks_base + block * BLOCK_K))[:, None]
        acc, l_i, m_i = _key_tile(acc, l_i, m_i, q, s_scale, k_base, v_base, k_desc, v_desc, first, offs_n, offs_d,
                                  S, sks, svs, svd, False, FP8_PV, IEEE, DESC)
    if not EVEN_N:
        if ragged & (S % BLOCK_N != 0):
            s_scale = qk_scale
            if FP8:
                s_scale = (row_scale * tl.load(ks_base + last.to(tl.int64) * BLOCK_K))[:, None]
            acc, l_i, m_i = _key_tile(acc, l_i, m_i, q, s_scale, k_base, v_base, k_desc, v_desc,
                                      (S // BLOCK_N) * BLOCK_N, offs_n, offs_d, S, sks, svs, svd, True, FP8_PV, IEEE,
                                      DESC)

    # 2. Pooled segments: row ranges of the pooled tensors, +ln(n) (in log2 units) per pooled key.
    if HAS_POOL:
        seg = P_START + b * spb + h * sph + q_block * spn
        seg_len = P_LEN + b * spb + h * sph + q_block * spn
        n_seg = tl.load(P_COUNT + b * spcb + h * spch + q_block * spcn)
        kp_base = KP + b * spkb + h * spkh
        vp_base = VP + b * spvb + h * spvh
        for j in range(0, n_seg):
            start = tl.load(seg + j * spk).to(tl.int64)
            end = start + tl.load(seg_len + j * spk)
            for first in range(start, end, BLOCK_N):
                rows = first + offs_n
                n_ok = rows < end
                kt = tl.load(kp_base + rows[None, :] * spks + offs_d[:, None], mask=n_ok[None, :], other=0.0)
                # ln(n) per pooled key; -inf past the segment end masks those columns in the same add.
                bias = tl.load(BIAS + rows, mask=n_ok, other=float("-inf"))
                if FP8:
                    k_scale = tl.load(ks_base + S + rows, mask=n_ok, other=0.0)
                    s = tl.dot(q, kt) * row_scale[:, None] * k_scale[None, :]
                elif IEEE:
                    s = tl.dot(q, kt, input_precision="ieee") * qk_scale
                else:
                    s = tl.dot(q, kt) * qk_scale
                s += bias[None, :]
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.exp2(s - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None]
                v = tl.load(vp_base + rows[:, None] * spvs + offs_d[None, :] * spvd, mask=n_ok[:, None], other=0.0)
                acc = _accumulate_pv(acc, p, v, FP8_PV, IEEE)
                m_i = m_new

    out = acc / l_i[:, None]
    if FP8_PV:
        v_scale = tl.load(VS + (b * H + h) * HEAD_DIM + offs_d)
        out = out * (v_scale / 448.0)[None, :]
    _store_rows(OUT + b * sob + h * soh, offs_m, sos, offs_d, m_ok, out)
    # Natural-log LSE of the scaled scores: (m + log2 l) is in log2 units.
    tl.store(LSE + (b * H + h) * S + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok)


def _configs():
    import torch

    from .config import autotune_configs, forward_tiles

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return autotune_configs(forward_tiles(device, 128))


block_sparse_fwd_kernel = LazyKernel(
    _block_sparse_fwd, configs=_configs,
    helpers=(_program_rows, _load_rows, _store_rows, _key_tile, _peel_ragged_block, _accumulate_pv),
    key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "HAS_POOL", "FP8", "FP8_PV", "EVEN_N", "DESC"],
)
