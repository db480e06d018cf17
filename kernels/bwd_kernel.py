"""Triton backward kernels for the full-resolution block-sparse forward: dk/dv per key tile, dq per query tile.

With s = scale * q.k, p = exp(s - lse), dp = do.v and delta = rowsum(do * o) - dlse (dlse: the gradient
reaching the LSE output, zero when only the output is used):
    dv = sum_q p^T do,   dk = scale * sum_q (p * (dp - delta))^T q,   dq = scale * sum_k (p * (dp - delta)) k.
Two kernels avoid atomics: the dk/dv kernel walks the query blocks that visit its key block (the transposed
look-up table), the dq kernel walks the forward table. Both recompute p from the saved LSE (base 2 inside).

Rows past S load as zeros. A padded query row gets LSE = +inf, so p = 0 and it adds nothing to dk/dv; padded
key rows of dk/dv are simply not stored; in dq a padded key's p is masked to 0 (exp2(-lse) alone could
overflow when every score of a row is very negative, and inf * 0 is NaN).
"""

from __future__ import annotations

from ._triton import LazyKernel, tl
from .fwd_kernel import _load_rows, _peel_ragged_block, _program_rows, _store_rows


def _block_sparse_bwd_dkdv(
    Q, K, V, DO, LSE2, DELTA, DK, DV,
    Q_INDEX, Q_COUNT,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh,
    sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
    sib, sih, sin, sik, scb, sch, scn,
    S, H, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    b, h, k_block, offs_n, offs_d, offs_m, n_ok = _program_rows(H, S, BLOCK_N, BLOCK_K, BLOCK_M, HEAD_DIM)
    k = _load_rows(K + b * skb + h * skh, offs_n, sks, offs_d, n_ok)
    v = _load_rows(V + b * svb + h * svh, offs_n, svs, offs_d, n_ok)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    TILES: tl.constexpr = BLOCK_Q // BLOCK_M
    lut = Q_INDEX + b * sib + h * sih + k_block * sin
    n_tiles = tl.load(Q_COUNT + b * scb + h * sch + k_block * scn) * TILES
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    row_base = (b * H + h) * S
    for t in range(0, n_tiles):
        block = tl.load(lut + (t // TILES) * sik).to(tl.int64)
        rows = block * BLOCK_Q + (t % TILES) * BLOCK_M + offs_m
        m_ok = rows < S
        # Transposed tiles (D, M) keep every product in the (N, *) orientation of dk and dv.
        qt = tl.load(q_base + rows[None, :] * sqs + offs_d[:, None], mask=m_ok[None, :], other=0.0)
        dot_t = tl.load(do_base + rows[None, :] * sdos + offs_d[:, None], mask=m_ok[None, :], other=0.0)
        lse2 = tl.load(LSE2 + row_base + rows, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + rows, mask=m_ok, other=0.0)
        if IEEE:
            pt = tl.exp2(tl.dot(k, qt, input_precision="ieee") * qk_scale - lse2[None, :])
            dv += tl.dot(pt, tl.trans(dot_t), input_precision="ieee")
            dpt = tl.dot(v, dot_t, input_precision="ieee")
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst, tl.trans(qt), input_precision="ieee")
        else:
            pt = tl.exp2(tl.dot(k, qt) * qk_scale - lse2[None, :])
            dv += tl.dot(pt.to(dot_t.dtype), tl.trans(dot_t))
            dpt = tl.dot(v, dot_t)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))

    _store_rows(DK + b * sdkb + h * sdkh, offs_n, sdks, offs_d, n_ok, dk * scale)
    _store_rows(DV + b * sdvb + h * sdvh, offs_n, sdvs, offs_d, n_ok, dv)


def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, first, offs_n, offs_d, S, sks, svs, qk_scale,
             MASKED: tl.constexpr, IEEE: tl.constexpr):
    """One key tile (rows first .. first + BLOCK_N) into dq; only the tile straddling S is MASKED."""
    rows = first + offs_n
    n_ok = rows < S
    if MASKED:
        kt = tl.load(k_base + rows[None, :] * sks + offs_d[:, None], mask=n_ok[None, :], other=0.0)
        vt = tl.load(v_base + rows[None, :] * svs + offs_d[:, None], mask=n_ok[None, :], other=0.0)
    else:
        kt = tl.load(k_base + rows[None, :] * sks + offs_d[:, None])
        vt = tl.load(v_base + rows[None, :] * svs + offs_d[:, None])
    if IEEE:
        p = tl.exp2(tl.dot(q, kt, input_precision="ieee") * qk_scale - lse2[:, None])
        if MASKED:
            p = tl.where(n_ok[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, tl.trans(kt), input_precision="ieee")
    else:
        p = tl.exp2(tl.dot(q, kt) * qk_scale - lse2[:, None])
        if MASKED:
            p = tl.where(n_ok[None, :], p, 0.0)
        dp = tl.dot(do, vt)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    return dq


def _block_sparse_bwd_dq(
    Q, K, V, DO, LSE2, DELTA, DQ,
    KV_INDEX, KV_COUNT,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdqb, sdqs, sdqh,
    sib, sih, sin, sik, scb, sch, scn,
    S, H, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, EVEN_N: tl.constexpr,
):
    b, h, q_block, offs_m, offs_d, offs_n, m_ok = _program_rows(H, S, BLOCK_M, BLOCK_Q, BLOCK_N, HEAD_DIM)
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqs, offs_d, m_ok)
    do = _load_rows(DO + b * sdob + h * sdoh, offs_m, sdos, offs_d, m_ok)
    row_base = (b * H + h) * S
    lse2 = tl.load(LSE2 + row_base + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    TILES: tl.constexpr = BLOCK_K // BLOCK_N
    lut = KV_INDEX + b * sib + h * sih + q_block * sin
    count = tl.load(KV_COUNT + b * scb + h * sch + q_block * scn)
    n_tiles = count * TILES
    if not EVEN_N:  # as in the forward: the ragged key block's tile straddling S runs masked after the loop
        n_tiles, ragged, last = _peel_ragged_block(lut, count, sik, S, BLOCK_K, BLOCK_N)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    # The block id is read one tile ahead, so no K/V load waits behind a dependent table load.
    block_next = tl.load(lut, mask=n_tiles > 0, other=0)
    for t in range(0, n_tiles):
        block = block_next.to(tl.int64)
        block_next = tl.load(lut + ((t + 1) // TILES) * sik, mask=t + 1 < n_tiles, other=0)
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, block * BLOCK_K + (t % TILES) * BLOCK_N, offs_n,
                      offs_d, S, sks, svs, qk_scale, False, IEEE)
    if not EVEN_N:
        if ragged & (S % BLOCK_N != 0):
            dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, (S // BLOCK_N) * BLOCK_N, offs_n, offs_d, S, sks,
                          svs, qk_scale, True, IEEE)

    _store_rows(DQ + b * sdqb + h * sdqh, offs_m, sdqs, offs_d, m_ok, dq * scale)


def _configs():
    import torch

    from .config import autotune_configs, backward_tiles

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return autotune_configs(backward_tiles(device, 128))


_KEY = ["HEAD_DIM", "BLOCK_M", "BLOCK_N"]
_ROWS = (_program_rows, _load_rows, _store_rows)
block_sparse_bwd_dkdv_kernel = LazyKernel(_block_sparse_bwd_dkdv, configs=_configs, key=_KEY, helpers=_ROWS)
block_sparse_bwd_dq_kernel = LazyKernel(_block_sparse_bwd_dq, configs=_configs, key=_KEY + ["EVEN_N"],
                                        helpers=(*_ROWS, _dq_tile, _peel_ragged_block))
