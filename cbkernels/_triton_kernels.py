"""Triton kernels of the four class-balanced losses (SPEC sections 3-4): one skeleton, specialised by constexpr flags.

A program owns ``ROWS`` rows and, of each, the columns ``[col_lo, col_hi)``; it works on ``[ROWS, BLOCK_C]``
tiles in float32 (float64 for float64 logits) and rounds the gradient to the logits' dtype once, after every
difference that can cancel (``p - q``, ``sigmoid(z) - 1``) has been formed. Three shapes of the same code:

- ``SINGLE_TILE``: the whole row is one tile, kept in registers, so the logits are read once
  (small C packs several rows per program, medium C one row).
- loop: an online max / sum-exp over column tiles, then a second pass that writes the gradient
  (softmax losses; the one-vs-all losses need no row statistic and write the gradient in the first pass).
- ``SPLIT``: few rows and huge C. ``cb_loss_kernel`` leaves per-chunk partials in a workspace and
  ``cb_loss_split_finish_kernel`` combines them in a fixed order (no atomics: every run gives the same bits;
  every program of a row computes the same combined value) and writes the loss and the gradient of its chunk.

The logit transforms of SPEC section 10 apply to every logit as it is read (``_transform``: softcap, offset,
margin, scale; the target's own transformed logit per row too), and the gradient is the raw logits'': the constant
``logit_scale`` joins the per-row coefficient, the softcap's ``sech^2(z / c)`` multiplies each element as it is
stored. The z-loss of SPEC section 11 (softmax losses) is per row: ``z_loss lse'**2`` joins the row's loss and
``2 z_loss lse' p_j`` its gradient. Flags that cost per element are constexprs (HAS_SOFTCAP, HAS_OFFSET,
HAS_MARGIN, HAS_ZLOSS, HAS_SCALE: off, the code is exactly the transform-free code: without HAS_SCALE the scale is
the literal 1.0, whose multiplies the compiler folds away).

The gradient may be written over the logits (in place): every program reads a tile before it writes it (the
softcap's factor comes from the raw logit of that read), and the target logit, needed after the tiles are
overwritten, is read in the first pass (the workspace in split mode).

Compiled float32 arithmetic is not the interpreter's (numpy's): ``tl.exp`` is ``ex2.approx`` (2 ulp) of the
rounded product ``x * log2(e)``, which adds ``1.2 * 2**-24 * |x|`` (6e-6 at |x| = 87); ``/`` is ``div.full`` (2 ulp);
``tl.sqrt`` is ``sqrt.approx.ftz`` (2**-23); ``tl.log`` is libdevice's ``logf`` (1 ulp, flushes subnormal input).
So the kernels use ``_exp`` (that rounding put back, at tl.exp's instruction count), correctly rounded divisions
per row (``_div_rn``: free there), per element a Newton-refined reciprocal (``_rcp``) and a log1p without a
division. The per-element focal modulator keeps ``tl.sqrt`` (gamma = 0.5: one instruction against eight) and
``tl.exp`` (general gamma: see ``_pow_gamma``).
Error bound and tolerances: tests/test_triton.py, "Float32 GPU error bound".

"""

import inspect

import triton.language as tl
from triton import jit

from . import _opdefs, _triton

# The codes the host launches with (one definition each: _opdefs, _triton), as Triton constexprs.
SOFTMAX = tl.constexpr(_opdefs.SOFTMAX)
SIGMOID = tl.constexpr(_opdefs.SIGMOID)
FOCAL = tl.constexpr(_opdefs.FOCAL)
SOFTMAX_FOCAL = tl.constexpr(_opdefs.SOFTMAX_FOCAL)

# GAMMA_CASE: the focal exponent, specialised where x ** gamma needs no transcendental.
GAMMA_ZERO = tl.constexpr(_triton.GAMMA_ZERO)  # also every non-focal loss
GAMMA_HALF = tl.constexpr(_triton.GAMMA_HALF)
GAMMA_ONE = tl.constexpr(_triton.GAMMA_ONE)
GAMMA_TWO = tl.constexpr(_triton.GAMMA_TWO)
GAMMA_ANY = tl.constexpr(_triton.GAMMA_ANY)
# tl.fdiv(approx=True) (div.approx.f32) is Triton >= 3.7's; Triton 3.6's fdiv takes no such argument and lowers to
# div.full.f32 (2 ulp as well, a few more instructions): _rcp's Newton step makes either correctly rounded.
FDIV_APPROX = tl.constexpr("approx" in inspect.signature(tl.fdiv).parameters)

# float32(ln 2): _exp's residual x - t * ln(2) in one FMA (the constant's own error, 2.7e-9 relative, leaves
# 2.7e-9 * |x| in the result: 2.4e-7 at the underflow threshold |x| = 87).
LN2_F32 = tl.constexpr(0.693147182464599609375)


@jit
def _exp(x):
    """``exp(x)`` for ``x <= 0`` (or NaN) within ``ex2.approx``'s 2 ulp, one rounding and ``2.7e-9 |x|``.

    ``tl.exp`` takes ``2 ** t`` of the rounded ``t = x * log2(e)``: the rounding of t (and of log2(e)) becomes a
    relative error of up to ``1.2 * 2**-24 * |x|`` (1.2e-6 at x = -16, 6e-6 at -87). Here the residual
    ``r = x - t * ln(2)``, a value of about ``2**-24 |x|`` that the FMA rounds once, puts it back:
    ``exp(x) = 2**t * exp(r) = 2**t * (1 + r)`` (``r**2 / 2 < 2**-35``). As many instructions as tl.exp (whose
    non-flushing ``ex2`` needs a range fix-up), and the interpreter evaluates the same formula (its FMA is exact
    too). Results below ``2**-126`` flush to 0 on a GPU (``ex2.approx.ftz``: Triton's ``tl.exp2``); -inf (masked
    logits) is clamped first, since inf - inf in r would be NaN; NaN passes the clamp. float64's ``tl.exp`` is
    libdevice's, already accurate."""
    if x.dtype == tl.float64:
        e = tl.exp(x)
    else:
        x = tl.maximum(x, -128.0, propagate_nan=tl.PropagateNan.ALL)
        t = x * 1.4426950408889634
        r = tl.fma(-t, LN2_F32, x)
        e = tl.exp2(t)
        # |.| changes nothing (e >= 0) and costs nothing (an operand modifier), but tells the compiler e >= 0: it then
        # drops the subnormal checks of log(1 + e) and 1 / (1 + e) (about ten instructions per focal-loss element).
        e = tl.abs(tl.fma(e, r, e))
    return e


@jit
def _div_rn(a, b):
    # Correctly rounded a / b: float32 `/` compiles to div.full (up to 2 ulp); float64 `/` is already div.rn.
    if b.dtype == tl.float64:
        q = a / b
    else:
        q = tl.div_rn(a, b)
    return q


@jit
def _rcp(w):
    # 1 / w for w in [1, 2], per element: div.approx (rcp.approx and a multiply, 2 ulp) and one Newton step give the
    # correctly rounded value for all but ~1e-5 of inputs (then 1 ulp off): four instructions where the compiler knows
    # w >= 1 (see _exp), against div.full's nine for 2 ulp and div.rn's ten and a branch. The interpreter's division
    # is exact, so it computes the correctly rounded value.
    if w.dtype == tl.float64:
        r = 1.0 / w
    else:
        if FDIV_APPROX:
            r = tl.fdiv(1.0, w, approx=True)
        else:
            r = tl.fdiv(1.0, w)
        r = tl.fma(r, tl.fma(-w, r, 1.0), r)
    return r


@jit
def _sqrt_rn(x):
    # Correctly rounded sqrt (float32 tl.sqrt is sqrt.approx.ftz; float64 tl.sqrt is already sqrt.rn).
    if x.dtype == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@jit
def _load_z(z_rows, cols, mask, CDT: tl.constexpr):
    """Every logit the kernels read passes here (row pointers and column indices, broadcast against each other), in
    the compute dtype, then through ``_transform``. Masked lanes read 0, which every transform keeps 0 (the margin
    touches the target column only, which is never a masked lane: chunk ends are tile ends or C)."""
    return tl.load(z_rows + cols, mask=mask, other=0.0).to(CDT)


@jit
def _store_grad(g_rows, cols, g, dz, valid, mask, HAS_SOFTCAP: tl.constexpr):
    """Every gradient element is stored here, rounded once to the gradient's dtype (after every cancelling
    difference was formed in the compute dtype), times the softcap's chain-rule factor ``dz`` (the scale's is in g's
    per-row coefficient)."""
    if HAS_SOFTCAP:
        g = tl.where(valid, g * dz, 0.0)  # an ignored row's g is 0, but its dz may be NaN (a NaN logit)
    tl.store(g_rows + cols, g.to(g_rows.dtype.element_ty), mask=mask)


# tanh on [0, TANH_SERIES_MAX) in float32 as x + x**3 Q(x**2): a least-squares fit of (tanh(x) - x) / x**3 with
# relative weight, 1 ulp at most (float32 Horner with FMA). Beyond it (1 - e) / (1 + e), e = exp(-2|x|) <= 0.33,
# does not cancel (1 - e >= 0.67).
TANH_SERIES_MAX = tl.constexpr(0.55)
TANH_Q0 = tl.constexpr(-0.33333320607613515)
TANH_Q1 = tl.constexpr(0.13332699682009644)
TANH_Q2 = tl.constexpr(-0.05386507907338105)
TANH_Q3 = tl.constexpr(0.02112724141220632)
TANH_Q4 = tl.constexpr(-0.006356495868345231)


@jit
def _tanh_sech2(x):
    """``tanh(x)`` and ``sech(x)**2 = 1 - tanh(x)**2`` from one ``e = exp(-2|x|)``: ``sech^2 = 4 e / (1 + e)**2``
    stays accurate where tanh rounds to 1 (``1 - t**2`` would be 0) and ``tanh|x| = (1 - e) / (1 + e)`` where it
    does not cancel; below TANH_SERIES_MAX, where ``1 - e`` would lose up to every digit (|x| = 1e-4: 13 bits), a
    short odd series in float32, Kahan's ``expm1(y) = (u - 1) y / log(u)`` (u = exp(y)) in float64 (no expm1 that
    also runs under the interpreter). NaN propagates; +-inf gives +-1 and 0."""
    ax = tl.abs(x)
    e = _exp(-2.0 * ax)
    r = _rcp(1.0 + e)
    sech2 = 4.0 * e * r * r
    far = (1.0 - e) * r
    if x.dtype == tl.float64:
        y = -2.0 * ax
        em = tl.where(e == 1.0, y, _div_rn((e - 1.0) * y, tl.log(e)))  # expm1(y), exact to a few ulp
        near = -em * _rcp(2.0 + em)
    else:
        x2 = ax * ax
        q = tl.fma(tl.fma(tl.fma(tl.fma(x2, TANH_Q4, TANH_Q3), x2, TANH_Q2), x2, TANH_Q1), x2, TANH_Q0)
        near = tl.fma(ax * x2, q, ax)
    t = tl.where(ax < TANH_SERIES_MAX, near, far)
    return tl.where(x < 0.0, -t, t), sech2


@jit
def _transform(z, idx, idx_ok, is_t, tf, HAS_SOFTCAP: tl.constexpr, HAS_OFFSET: tl.constexpr,
               HAS_MARGIN: tl.constexpr, DENSE: tl.constexpr = False):
    """SPEC section 10 on raw logits ``z`` of columns ``idx`` (``is_t``: the target's): ``(z', dz)``,
    ``z' = lscale (cap tanh(z / cap) + o_j - m_y [j == y])`` and ``dz = sech^2(z / cap)`` (``z`` itself, unused,
    without softcap). ``tf = (offset_ptr, m_y, cap, inv_cap, lscale)``, ``m_y`` shaped to broadcast against z.
    DENSE: ``is_t`` is the target tile q and ``m_y`` the margin vector's pointer: the margin is ``m_j q_ij``."""
    offset_ptr, m_y, cap, inv_cap, lscale = tf
    x = z
    dz = z
    if HAS_SOFTCAP:
        t, dz = _tanh_sech2(z * inv_cap)
        x = cap * t
    if HAS_OFFSET:
        x = x + tl.load(offset_ptr + idx, mask=idx_ok, other=0.0).to(z.dtype)
    if HAS_MARGIN:
        if DENSE:
            x = x - tl.load(m_y + idx, mask=idx_ok, other=0.0).to(z.dtype) * is_t
        else:
            x = tl.where(is_t, x - m_y, x)
    return x * lscale, dz


@jit
def _tile_tf(tf):
    # tf for [ROWS, BLOCK_C] tiles: the per-row margin as a column.
    offset_ptr, m_y, cap, inv_cap, lscale = tf
    return offset_ptr, m_y[:, None], cap, inv_cap, lscale


@jit
def _finite_or_zero(m):
    # A shift of -inf (a row, or a tile, that is all -inf so far) would turn exp(z - m) into exp(nan).
    return tl.where(m == float("-inf"), 0.0, m)


@jit
def _pow_gamma(x, log_x, gamma, GAMMA_CASE: tl.constexpr, PER_ROW: tl.constexpr):
    """``x ** gamma`` for x in [0, 1]; ``log_x`` is used only by the general case.

    A PER_ROW value gets the exact forms (free there). Per element, ``sqrt.approx`` (2**-23; flushes x < 2**-126 to
    0) and ``tl.exp``: the general case's argument ``gamma * log_x`` is itself rounded (``2**-24 |ln x**gamma|``, in
    the interpreter too), so ``_exp`` would only cut the error from 2.2 to 1 times that, and its two live values
    more per element made the 8192-wide focal tile spill (tools/gpu_build_check.py)."""
    if GAMMA_CASE == GAMMA_HALF:
        if PER_ROW:
            r = _sqrt_rn(x)
        else:
            r = tl.sqrt(x)
    elif GAMMA_CASE == GAMMA_ONE:
        r = x
    elif GAMMA_CASE == GAMMA_TWO:
        r = x * x
    elif PER_ROW:
        r = _exp(gamma * log_x)
    else:
        r = tl.exp(gamma * log_x)
    return r


@jit
def _one_vs_all_terms(z, is_t, gamma, LOSS_TYPE: tl.constexpr, GAMMA_CASE: tl.constexpr):
    """Loss term and its derivative for sigmoid CE and sigmoid focal, per element.

    With s = +1 on the target and -1 elsewhere and v = s z: term = m u with u = softplus(-v), derivative
    -s m [gamma q u + (1 - q)], q = sigmoid(v), m = (1 - q) ** gamma (m = 1 for sigmoid CE). SPEC section 4.
    """
    v = tl.where(is_t, z, -z)
    # One exp(-|v|) gives sigmoid(v), sigmoid(-v) and softplus(-v) together.
    e = _exp(-tl.abs(v))
    w = 1.0 + e
    # inv is the gradient of every misclassified element (v < 0), and (1 - q) ** gamma multiplies its error by gamma:
    # div.full's 2 ulp would be a quarter of the float32 gradient tolerance (tests/test_triton.py).
    inv = _rcp(w)
    log1p_e = _log1p_unit(e, w)
    # Selects rather than max(., 0) + ...: the same values, and fewer live registers in the 16-warp focal tiles
    # (tools/gpu_build_check.py: one variant spilled 8 bytes otherwise).
    u = tl.where(v > 0.0, log1p_e, log1p_e - v)
    small = e * inv  # sigmoid(-|v|), never formed as 1 - sigmoid(|v|) (that cancels to 0)
    pos = v >= 0.0
    one_minus_q = tl.where(pos, small, inv)
    if LOSS_TYPE == SIGMOID:
        term = u
        d = one_minus_q
    else:
        q = tl.where(pos, inv, small)
        # log(1 - q) = -softplus(v) = -(max(v, 0) + log1p(e)); -(u + v) would cancel for v < 0 (u = -v + log1p(e)
        # rounds log1p(e) to ulp(v)).
        m = _pow_gamma(one_minus_q, tl.where(v > 0.0, -v - log1p_e, -log1p_e), gamma, GAMMA_CASE, False)
        term = m * u
        d = m * (gamma * q * u + one_minus_q)
    return term, tl.where(is_t, -d, d)


@jit
def _log1p(x, w, inv_w):
    # log1p(x) for x >= 0 from w = 1 + x and inv_w = 1 / w (no log1p builtin that also runs under the interpreter):
    # log(w) alone loses what rounding 1 + x dropped, c = (w - 1) - x (exact for x < 2**24: Sterbenz), and
    # log1p(x) = log(w - c) = log(w) - c / w up to (c / w)**2 < 2**-48. No select needed: w = 1 gives x itself.
    return tl.fma(-((w - 1.0) - x), inv_w, tl.log(w))


@jit
def _log1p_unit(x, w):
    # _log1p for x in [0, 1] (w in [1, 2]): there log(w) - c, without the 1 / w, errs by c (1 - 1/w) <= 2**-24
    # log1p(x) at most. Per element, with no division (Goldberg's log(w) * x / (w - 1) needs one).
    return tl.log(w) - ((w - 1.0) - x)


@jit
def _softmax_row(m, so, sz, zy, a, valid, scale, n_cols, gamma, eps, z_loss,
                 LOSS_TYPE: tl.constexpr, GAMMA_CASE: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                 HAS_ZLOSS: tl.constexpr):
    """Row loss, gradient coefficient, sum-exp ``s``, ``1 - p_y``, the z-loss term and its gradient coefficient
    ``kz`` (HAS_ZLOSS; else placeholders) from the row max ``m``, the sum-exp of the other classes ``so`` (relative to
    m), the logit sum ``sz`` (label smoothing only) and the target logit ``zy``. SPEC sections 3-4 and 11.

    ``1 - p_y = so / s`` and ``L = log1p(so / e_y)`` are formed without a difference, so they keep full relative
    precision on confident rows, where ``1 - p_y`` and ``lse - z_y`` would cancel to 0 in float32; ``(m - z_y)``
    is exact where both are large (1e4 logits lose 1e-4 in ``m + log(s) - z_y``)."""
    # Every quotient here is per row, so correctly rounded at no cost: one_minus_p is the target's gradient, and 1/s
    # scales every other one.
    ey = _exp(zy - _finite_or_zero(m))
    s = so + ey
    ratio = _div_rn(so, ey)
    direct = (m - zy) + tl.log(s)
    w = 1.0 + ratio
    # Once e_y is no longer a normal number the direct form is the accurate one (L is then large).
    nll = tl.where((ey >= 1.1754943508222875e-38) & (ratio < float("inf")), _log1p(ratio, w, _div_rn(1.0, w)), direct)
    one_minus_p = _div_rn(so, s)
    if LOSS_TYPE == SOFTMAX:
        loss = nll
        if HAS_SMOOTHING:
            loss = (1.0 - eps) * nll + eps * ((m - _div_rn(sz, n_cols.to(sz.dtype))) + tl.log(s))
        coef = a * scale
    else:
        p_t = _div_rn(ey, s)
        mod = _pow_gamma(one_minus_p, tl.log(one_minus_p), gamma, GAMMA_CASE, True)
        # r = L / (1 - P) -> 1 as 1 - P -> 0: keeps the gradient finite for gamma < 1.
        r = tl.where(one_minus_p > 0.0, _div_rn(nll, one_minus_p), 1.0)
        loss = mod * nll
        coef = a * scale * mod * (1.0 + gamma * p_t * r)
    row = tl.where(valid, a * loss, 0.0)
    if HAS_ZLOSS:
        # z_loss lse**2, not weighted by a_i; d/dz'_j = 2 z_loss lse p_j (s >= 1: lse = m + log(s) >= m).
        lse = _finite_or_zero(m) + tl.log(s)
        z_term = tl.where(valid, z_loss * lse * lse, 0.0)
        kz = tl.where(valid, 2.0 * z_loss * lse * scale, 0.0)
        row += z_term
    else:
        z_term = row
        kz = row
    return row, coef, s, one_minus_p, z_term, kz


@jit
def _softmax_grad(p, is_t, coef, valid, eps, n_cols, one_minus_p, kz, HAS_SMOOTHING: tl.constexpr,
                  HAS_ZLOSS: tl.constexpr):
    # p - q in float32 before the one rounding to the gradient's dtype; the target's p_y - 1 is -(1 - p_y) from the
    # other classes' sum (p_y - 1 itself would cancel to 0 on a confident row, and in bf16 long before).
    if HAS_SMOOTHING:
        g = tl.where(is_t, eps - one_minus_p[:, None], p) - _div_rn(eps, n_cols.to(eps.dtype))
    else:
        g = tl.where(is_t, -one_minus_p[:, None], p)
    if HAS_ZLOSS:
        # Masked after the sum: an ignored row's p may be NaN (its logits are read too), and 0 * NaN is NaN.
        g = tl.where(valid[:, None], coef[:, None] * g + kz[:, None] * p, 0.0)
    else:
        g = tl.where(valid[:, None], coef[:, None] * g, 0.0)
    return g


@jit
def _softmax_stats(z_rows, row_ok, y, col_lo, col_hi, tf, CDT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Online max / sum-exp of the non-target classes (and logit sum) over the columns [col_lo, col_hi) of the
    transformed logits."""
    cols = tl.arange(0, BLOCK_C)
    m = tl.full([ROWS], float("-inf"), CDT)
    s = tl.zeros([ROWS], CDT)
    sz = tl.zeros([ROWS], CDT)
    for c0 in tl.range(col_lo, col_hi, BLOCK_C):
        cc = c0 + cols
        col_ok = cc < col_hi
        mask = row_ok[:, None] & col_ok[None, :]
        z, _ = _transform(_load_z(z_rows[:, None], cc[None, :], mask, CDT), cc[None, :], col_ok[None, :],
                          cc[None, :] == y[:, None], tf, HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN)
        m_new = tl.maximum(m, tl.max(tl.where(mask, z, float("-inf")), axis=1))
        shift = _finite_or_zero(m_new)
        # Masked lanes are re-masked after exp: exp(0 - shift) would otherwise count. The target is left out.
        tile = tl.sum(tl.where(mask & (cc[None, :] != y[:, None]), _exp(z - shift[:, None]), 0.0), axis=1)
        s = s * _exp(m - shift) + tile
        m = m_new
        if HAS_SMOOTHING:
            sz += tl.sum(z, axis=1)  # masked lanes were loaded as 0
    return m, s, sz


@jit
def _softmax_grad_pass(z_rows, g_rows, row_ok, y, m, s, one_minus_p, coef, kz, valid, eps, n_cols, col_lo, col_hi,
                       tf, CDT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    # p = exp(z - m) / s rather than exp(z - lse): z - m is exact where p is near 1, z - lse carries lse's rounding
    # (half an ulp of |lse|, 1e-6 relative at lse ~ 16) into p.
    shift = _finite_or_zero(m)
    inv_s = _div_rn(1.0, s)
    cols = tl.arange(0, BLOCK_C)
    n_tiles = (col_hi - col_lo + BLOCK_C - 1) // BLOCK_C
    for i in tl.range(0, n_tiles):
        # Last tile first: the statistics pass read it last, so it is the likeliest still in L2.
        cc = col_lo + (n_tiles - 1 - i) * BLOCK_C + cols
        col_ok = cc < col_hi
        mask = row_ok[:, None] & col_ok[None, :]
        is_t = cc[None, :] == y[:, None]
        # The raw tile, read again before this program overwrites it (in place): the softcap's factor needs it.
        z, dz = _transform(_load_z(z_rows[:, None], cc[None, :], mask, CDT), cc[None, :], col_ok[None, :], is_t, tf,
                           HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN)
        p = _exp(z - shift[:, None]) * inv_s[:, None]
        g = _softmax_grad(p, is_t, coef, valid, eps, n_cols, one_minus_p, kz, HAS_SMOOTHING, HAS_ZLOSS)
        _store_grad(g_rows[:, None], cc[None, :], g, dz, valid[:, None], mask, HAS_SOFTCAP)


@jit
def _one_vs_all_pass(z_rows, g_rows, row_ok, y, valid, coef, gamma, col_lo, col_hi, tf,
                     CDT: tl.constexpr, LOSS_TYPE: tl.constexpr, GAMMA_CASE: tl.constexpr, HAS_GRAD: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row sums of the one-vs-all terms over [col_lo, col_hi); writes the gradient on the way (one read)."""
    cols = tl.arange(0, BLOCK_C)
    acc = tl.zeros([ROWS], CDT)
    for c0 in tl.range(col_lo, col_hi, BLOCK_C):
        cc = c0 + cols
        col_ok = cc < col_hi
        mask = row_ok[:, None] & col_ok[None, :]
        is_t = cc[None, :] == y[:, None]
        z, dz = _transform(_load_z(z_rows[:, None], cc[None, :], mask, CDT), cc[None, :], col_ok[None, :], is_t, tf,
                           HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN)
        term, d = _one_vs_all_terms(z, is_t, gamma, LOSS_TYPE, GAMMA_CASE)
        acc += tl.sum(tl.where(mask, term, 0.0), axis=1)
        if HAS_GRAD:
            g = tl.where(valid[:, None], coef[:, None] * d, 0.0)
            _store_grad(g_rows[:, None], cc[None, :], g, dz, valid[:, None], mask, HAS_SOFTCAP)
    return acc


# ------------------------------------------------------------------------------------------------- dense targets
# SPEC section 9 (DENSE): the target is a floating [N, C] tile q, read in the same pass as the logits tile (the
# logits' dtype or float32, converted on load). No ignore_index: every row counts. CLASS_WEIGHTS ("class" mode):
# w_j weighs each class term; otherwise ("sample" mode) a_i = sum_j w_j q_ij / sum_j q_ij weighs the row, a row
# statistic: from the tile in registers on a single tile, else from a pass over q that comes before the gradient
# (softmax's statistics pass; for the one-vs-all losses a pass that reads q only, or _triton_reduce's mass partials
# on the split path).

# Workspace slots per (row, chunk) on the dense split path: m, s_other, n_max, T (softmax focal: F), K (S), wq, sq.
WS_DENSE = tl.constexpr(8)
SPLITS_MAX = tl.constexpr(_triton.MAX_SPLITS)


@jit
def _load_q(q_rows, cols, mask, CDT: tl.constexpr):
    # As _load_z: masked lanes read 0, a class without target mass.
    return tl.load(q_rows + cols, mask=mask, other=0.0).to(CDT)


@jit
def _load_w(weight_ptr, cols, col_ok, CDT: tl.constexpr):
    # The class weights of a tile's columns, as a row that broadcasts over its rows.
    return tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(CDT)[None, :]


@jit
def _sample_weight(wq, sq):
    # a_i, 1 for a row without mass; per row, so correctly rounded at no cost.
    return tl.where(sq > 0.0, _div_rn(wq, tl.where(sq > 0.0, sq, 1.0)), 1.0)


@jit
def _mass_sums(q_rows, weight_ptr, row_ok, col_lo, col_hi, CDT: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """``sum_j w_j q_ij`` and ``sum_j q_ij`` over [col_lo, col_hi): the pass that reads q only, for a sample-mode row
    weight that a gradient written in the first pass over the logits needs (and _triton_reduce's mass partials)."""
    cols = tl.arange(0, BLOCK_C)
    wq = tl.zeros([ROWS], CDT)
    sq = tl.zeros([ROWS], CDT)
    for c0 in tl.range(col_lo, col_hi, BLOCK_C):
        cc = c0 + cols
        col_ok = cc < col_hi
        q = _load_q(q_rows[:, None], cc[None, :], row_ok[:, None] & col_ok[None, :], CDT)
        wq += tl.sum(_load_w(weight_ptr, cc, col_ok, CDT) * q, axis=1)
        sq += tl.sum(q, axis=1)
    return wq, sq


@jit
def _split_sample_weight(rw_ptr, rows, row_ok, n_splits):
    # a_i from the row's mass partials [N, K, 2] (_triton_reduce.mass_partials), combined in a fixed order.
    k = tl.arange(0, SPLITS_MAX)
    kmask = row_ok[:, None] & (k < n_splits)[None, :]
    parts = rw_ptr + (rows[:, None] * n_splits + k[None, :]) * 2
    return _sample_weight(tl.sum(tl.load(parts, mask=kmask, other=0.0), axis=1),
                          tl.sum(tl.load(parts + 1, mask=kmask, other=0.0), axis=1))


@jit
def _dense_row_setup(scale_ptr, rows, n_rows, n_cols, gamma_hi, gamma_lo, eps_hi, eps_lo, CDT: tl.constexpr):
    # _row_setup without a target index; eps_c = eps / C, the smoothed target's uniform part.
    row_ok = rows < n_rows
    scale = tl.load(scale_ptr).to(CDT)
    gamma = tl.cast(gamma_hi, CDT) + tl.cast(gamma_lo, CDT)
    eps = tl.cast(eps_hi, CDT) + tl.cast(eps_lo, CDT)
    return row_ok, scale, gamma, eps, _div_rn(eps, n_cols.to(CDT))


@jit
def _lse_gap(n_max, s_other):
    """``lse - m``, the sum-exp ``s`` and ``s - 1`` of a row from the count of its max logits and the others'
    sum-exp relative to the max: ``log1p((n_max - 1) + s_other)`` keeps full relative precision on a confident row,
    where ``s = n_max + s_other`` rounds to 1 (as the index path's log1p(s_other / e_y)); per row, so exact
    divisions."""
    x = (n_max - 1.0) + s_other
    w = 1.0 + x
    return _log1p(x, w, _div_rn(1.0, w)), w, x


@jit
def _max_split(z, m, mask):
    # A tile's count of logits at the max m and the sum-exp of the others (NaN among them: it propagates).
    at_max = mask & (z == m[:, None])
    return (tl.sum(at_max.to(z.dtype), axis=1),
            tl.sum(tl.where(mask & (z != m[:, None]), _exp(z - _finite_or_zero(m)[:, None]), 0.0), axis=1))


@jit
def _softmax_focal_terms(lg, gamma, GAMMA_CASE: tl.constexpr):
    """Softmax focal per element from ``L = lse - z'_j >= 0``: ``(1 - P)^gamma`` and ``c = (1 - P)^gamma (1 + gamma P
    r)``, ``r = L / (1 - P)``, P = exp(-L) (SPEC section 4 at P = p_j; r -> 1 as 1 - P -> 0).

    ``1 - P = -expm1(-L)``: ``1 - u`` (u = exp(-L)) keeps no relative precision for small L; there
    ``r = -log(u) / (1 - u)`` is smooth in u, so u's own rounding hardly moves it (Kahan's expm1), and
    ``1 - P = L / r``. Beyond L = log 2, ``1 - u >= 1/2`` is exact to an ulp."""
    u = _exp(-lg)
    near = u > 0.5
    gap = 1.0 - u  # exact where u >= 1/2
    r_near = tl.where(u < 1.0, _div_rn(-tl.log(u), tl.where(u < 1.0, gap, 1.0)), 1.0)
    # Both divisors lie in [1, 2] (r_near = L / (1 - e^-L) <= log(2) / (1/2) = 1.39; 2 (1 - u) beyond): _rcp's range.
    inv = _rcp(tl.where(near, r_near, 2.0 * gap))
    omp = tl.where(near, lg * inv, gap)
    r = tl.where(near, r_near, 2.0 * lg * inv)
    mod = _pow_gamma(omp, tl.log(omp), gamma, GAMMA_CASE, False)
    return mod, mod * (1.0 + gamma * u * r)


@jit
def _dense_softmax_terms(z, q, w, mask, shift, lse_gap, eps, eps_c, gamma, LOSS_TYPE: tl.constexpr,
                         GAMMA_CASE: tl.constexpr, HAS_SMOOTHING: tl.constexpr, CLASS_WEIGHTS: tl.constexpr):
    """One tile of a softmax loss with a dense target: ``(part, K_tile, k)`` with ``k_j`` each element's target term
    of the gradient ``coef (K p_j - k_j)``, ``K = sum_j k_j``, and ``part`` its share of the row loss:
    softmax ``k = cw q'``, ``part = sum_j k_j (m - z'_j)`` (the row adds ``K (lse - m)``: every term >= 0, nothing
    cancels); softmax focal ``k = cw q c``, ``part = sum_j cw q_j (1 - P_j)^gamma L_j``, ``L_j = (m - z'_j) +
    (lse - m)`` (``lse_gap``). Classes without target weight are left out: at a logit of -inf (a masked vocabulary)
    they would give 0 * inf."""
    gap = shift[:, None] - z
    if LOSS_TYPE == SOFTMAX:
        if HAS_SMOOTHING:
            q = tl.where(mask, (1.0 - eps) * q + eps_c, 0.0)
        if CLASS_WEIGHTS:
            q = w * q
        k = q
        part = tl.sum(tl.where(k > 0.0, k * gap, 0.0), axis=1)
    else:
        if CLASS_WEIGHTS:
            q = w * q
        lg = gap + lse_gap[:, None]
        mod, c = _softmax_focal_terms(lg, gamma, GAMMA_CASE)
        on = q > 0.0
        part = tl.sum(tl.where(on, q * mod * lg, 0.0), axis=1)
        k = tl.where(on, q * c, 0.0)
    return part, tl.sum(k, axis=1), k


@jit
def _dense_softmax_grad(e, s, x, big_k, k, coef, kz, HAS_ZLOSS: tl.constexpr):
    """``coef (K p - k) + kz p`` from ``e = exp(z' - m)``, ``s`` and ``x = s - 1`` (_lse_gap), in the compute dtype
    before the one rounding. At a confident row's max (p -> 1, k = K for a one-hot row) ``K p - k`` cancels; there
    ``e = 1`` exactly and it is ``((K - k) - k x) / s``, from terms that do not (0 - k x exactly for one-hot)."""
    inv_s = _div_rn(1.0, s)[:, None]
    p = e * inv_s
    d = tl.where(e == 1.0, ((big_k[:, None] - k) - k * x[:, None]) * inv_s, big_k[:, None] * p - k)
    g = coef[:, None] * d
    if HAS_ZLOSS:
        g = g + kz[:, None] * p
    return g


@jit
def _dense_row(loss, a, scale, shift, lse_gap, z_loss, HAS_ZLOSS: tl.constexpr):
    """The row's loss ``a loss`` plus the z-loss (not weighted), the gradient coefficient ``a scale``, and the
    z-loss term and its gradient coefficient (HAS_ZLOSS; else placeholders)."""
    row = a * loss
    if HAS_ZLOSS:
        lse = shift + lse_gap
        z_term = z_loss * lse * lse
        kz = 2.0 * z_loss * lse * scale
        row += z_term
    else:
        z_term = row
        kz = row
    return row, a * scale, z_term, kz


@jit
def _dense_softmax_stats(z_rows, q_rows, weight_ptr, row_ok, col_lo, col_hi, tf, eps, eps_c, CDT: tl.constexpr,
                         LOSS_TYPE: tl.constexpr, HAS_SMOOTHING: tl.constexpr, CLASS_WEIGHTS: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Online max, its count and the others' sum-exp (see _lse_gap) over [col_lo, col_hi), and in the same pass
    softmax CE's ``T = sum_j k_j (m - z'_j)`` and ``K = sum_j k_j`` (relative to the max so far) and sample mode's
    mass sums."""
    cols = tl.arange(0, BLOCK_C)
    m = tl.full([ROWS], float("-inf"), CDT)
    n_max = tl.zeros([ROWS], CDT)
    s_other = tl.zeros([ROWS], CDT)
    t = tl.zeros([ROWS], CDT)
    big_k = tl.zeros([ROWS], CDT)
    wq = tl.zeros([ROWS], CDT)
    sq = tl.zeros([ROWS], CDT)
    for c0 in tl.range(col_lo, col_hi, BLOCK_C):
        cc = c0 + cols
        col_ok = cc < col_hi
        mask = row_ok[:, None] & col_ok[None, :]
        q = _load_q(q_rows[:, None], cc[None, :], mask, CDT)
        w = _load_w(weight_ptr, cc, col_ok, CDT)
        z, _ = _transform(_load_z(z_rows[:, None], cc[None, :], mask, CDT), cc[None, :], col_ok[None, :], q, tf,
                          HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN, True)
        m_new = tl.maximum(m, tl.max(tl.where(mask, z, float("-inf")), axis=1))
        shift = _finite_or_zero(m_new)
        n_tile, s_tile = _max_split(z, m_new, mask)
        # A new max turns the old ones into others.
        up = m_new > m
        s_other = tl.where(up, (s_other + n_max) * _exp(m - shift), s_other) + s_tile
        n_max = tl.where(up, n_tile, n_max + n_tile)
        if LOSS_TYPE == SOFTMAX:
            part, k_tile, _ = _dense_softmax_terms(z, q, w, mask, shift, s_tile, eps, eps_c, 0.0, LOSS_TYPE,
                                                   GAMMA_ZERO, HAS_SMOOTHING, CLASS_WEIGHTS)
            # Moving the reference up from the old max adds K (m_new - m_old) >= 0: still no term cancels.
            t = t + big_k * (shift - _finite_or_zero(m)) + part
            big_k += k_tile
        if not CLASS_WEIGHTS:
            wq += tl.sum(w * q, axis=1)
            sq += tl.sum(q, axis=1)
        m = m_new
    return m, n_max, s_other, t, big_k, wq, sq


@jit
def _dense_focal_sums(z_rows, q_rows, weight_ptr, row_ok, shift, lse_gap, gamma, col_lo, col_hi, tf,
                      CDT: tl.constexpr, GAMMA_CASE: tl.constexpr, CLASS_WEIGHTS: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr,
                      ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Softmax focal's loss sum and ``S = sum_j cw_j q_j c_j`` over [col_lo, col_hi): both need lse, so a pass of
    their own between the statistics and the gradient."""
    cols = tl.arange(0, BLOCK_C)
    loss = tl.zeros([ROWS], CDT)
    big_s = tl.zeros([ROWS], CDT)
    for c0 in tl.range(col_lo, col_hi, BLOCK_C):
        cc = c0 + cols
        col_ok = cc < col_hi
        mask = row_ok[:, None] & col_ok[None, :]
        q = _load_q(q_rows[:, None], cc[None, :], mask, CDT)
        z, _ = _transform(_load_z(z_rows[:, None], cc[None, :], mask, CDT), cc[None, :], col_ok[None, :], q, tf,
                          HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN, True)
        part, k_tile, _ = _dense_softmax_terms(z, q, _load_w(weight_ptr, cc, col_ok, CDT), mask, shift, lse_gap,
                                               0.0, 0.0, gamma, SOFTMAX_FOCAL, GAMMA_CASE, False, CLASS_WEIGHTS)
        loss += part
        big_s += k_tile
    return loss, big_s


@jit
def _dense_softmax_grad_pass(z_rows, q_rows, g_rows, weight_ptr, row_ok, m, s, x, lse_gap, big_k, coef, kz, eps,
                             eps_c, gamma, col_lo, col_hi, tf, CDT: tl.constexpr, LOSS_TYPE: tl.constexpr,
                             GAMMA_CASE: tl.constexpr, HAS_SMOOTHING: tl.constexpr, CLASS_WEIGHTS: tl.constexpr,
                             HAS_ZLOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                             HAS_MARGIN: tl.constexpr, BLOCK_C: tl.constexpr):
    # As _softmax_grad_pass: p = exp(z' - m) / s, the last tile first; q is read again with its logits.
    shift = _finite_or_zero(m)
    cols = tl.arange(0, BLOCK_C)
    n_tiles = (col_hi - col_lo + BLOCK_C - 1) // BLOCK_C
    for i in tl.range(0, n_tiles):
        cc = col_lo + (n_tiles - 1 - i) * BLOCK_C + cols
        col_ok = cc < col_hi
        mask = row_ok[:, None] & col_ok[None, :]
        q = _load_q(q_rows[:, None], cc[None, :], mask, CDT)
        z, dz = _transform(_load_z(z_rows[:, None], cc[None, :], mask, CDT), cc[None, :], col_ok[None, :], q, tf,
                           HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN, True)
        _, _, k = _dense_softmax_terms(z, q, _load_w(weight_ptr, cc, col_ok, CDT), mask, shift, lse_gap, eps,
                                       eps_c, gamma, LOSS_TYPE, GAMMA_CASE, HAS_SMOOTHING, CLASS_WEIGHTS)
        g = _dense_softmax_grad(_exp(z - shift[:, None]), s, x, big_k, k, coef, kz, HAS_ZLOSS)
        _store_grad(g_rows[:, None], cc[None, :], g, dz, row_ok[:, None], mask, HAS_SOFTCAP)


@jit
def _dense_one_vs_all_terms(z, q, gamma, LOSS_TYPE: tl.constexpr, GAMMA_CASE: tl.constexpr):
    """Loss term and derivative of sigmoid CE and sigmoid focal for a soft target q, per element:
    ``ce = softplus(z) - q z`` and ``sigma(z) - q``; focal ``(1 - pt)^gamma ce`` with ``1 - pt = q sigma(-z) +
    (1 - q) sigma(z)`` and derivative ``(1 - pt)^gamma [gamma (1 - 2q) sigma(z) sigma(-z) / (1 - pt) ce +
    sigma(z) - q]`` (the ratio is 0 where 1 - pt underflows to 0). Index targets are the case q in {0, 1}."""
    e = _exp(-tl.abs(z))
    one_e = 1.0 + e
    inv = _rcp(one_e)  # sigma(|z|)
    small = e * inv  # sigma(-|z|), never 1 - sigma(|z|)
    pos = z >= 0.0
    omq = 1.0 - q
    # Two non-negative terms each, so neither cancels: softplus(z) - q z = log1p(e) + (1 - q) z (z >= 0), or
    # log1p(e) + q |z|; sigma(z) - q = (1 - q) - sigma(-z) (z >= 0), or sigma(z) - q with sigma(z) < 1/2.
    ce = _log1p_unit(e, one_e) + tl.where(pos, omq * z, -q * z)
    d = tl.where(pos, omq - small, small - q)
    if LOSS_TYPE == FOCAL:
        # 1 - pt = dn / (1 + e) with dn = (1 - q) + q e (z >= 0), q + (1 - q) e: sums again; and
        # sigma(z) sigma(-z) / (1 - pt) = sigma(-|z|) / dn <= 1 (dn >= e).
        dn = tl.where(pos, omq + q * e, q + omq * e)
        omp = dn * inv
        mod = _pow_gamma(omp, tl.log(omp), gamma, GAMMA_CASE, False)
        ratio = tl.where(dn > 0.0, _div_rn(small, tl.where(dn > 0.0, dn, 1.0)), 0.0)
        d = mod * (gamma * (1.0 - 2.0 * q) * ratio * ce + d)
        ce = mod * ce
    return ce, d


@jit
def _dense_one_vs_all_pass(z_rows, q_rows, g_rows, weight_ptr, row_ok, a, scale, gamma, col_lo, col_hi, tf,
                           CDT: tl.constexpr, LOSS_TYPE: tl.constexpr, GAMMA_CASE: tl.constexpr,
                           HAS_GRAD: tl.constexpr, CLASS_WEIGHTS: tl.constexpr, TILE_WEIGHT: tl.constexpr,
                           HAS_SOFTCAP: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """``a sum_j cw_j e_j`` over [col_lo, col_hi), writing the gradient ``a scale cw_j de_j/dz'`` on the way (one
    read). TILE_WEIGHT (sample mode on a single tile, where the loop runs once): ``a`` from the q tile just read."""
    cols = tl.arange(0, BLOCK_C)
    acc = tl.zeros([ROWS], CDT)
    for c0 in tl.range(col_lo, col_hi, BLOCK_C):
        cc = c0 + cols
        col_ok = cc < col_hi
        mask = row_ok[:, None] & col_ok[None, :]
        q = _load_q(q_rows[:, None], cc[None, :], mask, CDT)
        w = _load_w(weight_ptr, cc, col_ok, CDT)
        z, dz = _transform(_load_z(z_rows[:, None], cc[None, :], mask, CDT), cc[None, :], col_ok[None, :], q, tf,
                           HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN, True)
        term, d = _dense_one_vs_all_terms(z, q, gamma, LOSS_TYPE, GAMMA_CASE)
        if CLASS_WEIGHTS:
            term = w * term
            d = w * d
        if TILE_WEIGHT:
            a = _sample_weight(tl.sum(w * q, axis=1), tl.sum(q, axis=1))
        acc += tl.sum(tl.where(mask, term, 0.0), axis=1)
        if HAS_GRAD:
            _store_grad(g_rows[:, None], cc[None, :], (a * scale)[:, None] * d, dz, row_ok[:, None], mask,
                        HAS_SOFTCAP)
    return a * acc


@jit
def _aligned(x, ALIGN: tl.constexpr):
    # The host checked that x (C, a row stride, a chunk) is a multiple of ALIGN, so this is x itself; written so,
    # it lets the compiler prove ALIGN-wide vector loads and stores where Triton alone only detects multiples of 16
    # (C = 1000 gets 16-byte accesses, C = 8142 4-byte ones). tl.multiple_of does not attach to scalar arguments.
    return x // ALIGN * ALIGN


@jit
def _row_setup(target_ptr, weight_ptr, scale_ptr, rows, n_rows, n_cols, ignore_index,
               gamma_hi, gamma_lo, eps_hi, eps_lo, CDT: tl.constexpr):
    row_ok = rows < n_rows
    y = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (y != ignore_index)
    # The API edge guarantees 0 <= y < C (a device-side assert on CUDA); the mask only keeps a bad index from
    # faulting. -1 matches no column.
    hit = valid & (y >= 0) & (y < n_cols)
    y = tl.where(hit, y, -1).to(tl.int32)
    a = tl.load(weight_ptr + y, mask=hit, other=0.0).to(CDT)
    scale = tl.load(scale_ptr).to(CDT)
    # Python floats reach a kernel as float32; the float64 path gets the rest of the digits from the low part.
    gamma = tl.cast(gamma_hi, CDT) + tl.cast(gamma_lo, CDT)
    eps = tl.cast(eps_hi, CDT) + tl.cast(eps_lo, CDT)
    return row_ok, y, valid, hit, a, scale, gamma, eps


@jit
def _per_row(rows, flag):
    # A runtime flag as a row mask (the interpreter rejects a broadcast scalar mask).
    return (rows * 0 + flag) != 0


@jit
def _transform_setup(margin_ptr, y, hit, cap_hi, cap_lo, inv_cap_hi, inv_cap_lo, lscale_hi, lscale_lo, zloss_hi,
                     zloss_lo, CDT: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_SCALE: tl.constexpr,
                     DENSE: tl.constexpr = False):
    """The rows' ``tf`` (see _transform; the margin of each row's target, DENSE: the margin vector) and the z-loss
    weight. Without HAS_SCALE the scale is the literal 1.0: ``x * 1.0`` folds to ``x`` at compile time (a runtime 1
    would cost a multiply per element and, in the widest tiles, registers)."""
    if DENSE:
        m_y = margin_ptr
    elif HAS_MARGIN:
        m_y = tl.load(margin_ptr + y, mask=hit, other=0.0).to(CDT)
    else:
        m_y = tl.zeros(y.shape, CDT)
    cap = tl.cast(cap_hi, CDT) + tl.cast(cap_lo, CDT)
    inv_cap = tl.cast(inv_cap_hi, CDT) + tl.cast(inv_cap_lo, CDT)
    if HAS_SCALE:
        lscale = tl.cast(lscale_hi, CDT) + tl.cast(lscale_lo, CDT)
    else:
        lscale = 1.0
    z_loss = tl.cast(zloss_hi, CDT) + tl.cast(zloss_lo, CDT)
    return m_y, cap, inv_cap, lscale, z_loss


@jit
def cb_loss_kernel(
    logits_ptr, target_ptr, weight_ptr, scale_ptr, loss_ptr, grad_ptr, ws_ptr, offset_ptr, margin_ptr, zrows_ptr,
    n_rows, n_cols, stride_z, stride_g, cols_per_split,
    ignore_index, gamma_hi, gamma_lo, eps_hi, eps_lo,
    cap_hi, cap_lo, inv_cap_hi, inv_cap_lo, lscale_hi, lscale_lo, zloss_hi, zloss_lo, store_z, stride_q, rw_ptr,
    LOSS_TYPE: tl.constexpr, GAMMA_CASE: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_GRAD: tl.constexpr,
    SINGLE_TILE: tl.constexpr, SPLIT: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    HAS_SCALE: tl.constexpr, DENSE: tl.constexpr = False, CLASS_WEIGHTS: tl.constexpr = False,
):
    """Per-row loss ``loss[N]`` and gradient ``scale * dl/dz`` (``grad``, when HAS_GRAD) of ROWS rows per program.

    Columns have unit stride; rows ``stride_z`` (logits) and ``stride_g`` (gradient). With SPLIT, program
    (r, k) covers columns [k * cols_per_split, (k + 1) * cols_per_split) and leaves partials in ``ws [N, K, 4]``.
    Transforms (SPEC section 10): ``offset_ptr``/``margin_ptr`` ``[C]`` float32 (read with HAS_OFFSET/HAS_MARGIN),
    softcap ``cap``, ``1 / cap`` (HAS_SOFTCAP), ``lscale``; the z-loss weight (HAS_ZLOSS) and, when ``store_z``, each
    row's z-loss term in ``zrows [N]``. Floats come as float32 ``hi + lo`` pairs (see _row_setup).
    DENSE (SPEC section 9): ``target`` is q ``[N, C]`` with row stride ``stride_q``, CLASS_WEIGHTS its weight mode;
    the split path's partials are ``ws [N, K, WS_DENSE]``, and a sample-mode one-vs-all split reads the rows' mass
    partials ``rw [N, K, 2]`` (_triton_reduce.mass_partials). Both arguments are unused without DENSE (appended
    last: the index kernels' parameters keep their places).
    """
    CDT: tl.constexpr = loss_ptr.dtype.element_ty
    if ALIGN > 1:
        n_cols = _aligned(n_cols, ALIGN)
        stride_z = _aligned(stride_z, ALIGN)
        stride_g = _aligned(stride_g, ALIGN)
    # int64 row offsets: row * stride passes 2**31 for large N * C (e.g. 16k rows of a 256k vocabulary).
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    if DENSE:
        row_ok, scale, gamma, eps, eps_c = _dense_row_setup(scale_ptr, rows, n_rows, n_cols, gamma_hi, gamma_lo,
                                                            eps_hi, eps_lo, CDT)
        margin, cap, inv_cap, lscale, z_loss = _transform_setup(
            margin_ptr, rows, row_ok, cap_hi, cap_lo, inv_cap_hi, inv_cap_lo, lscale_hi, lscale_lo, zloss_hi,
            zloss_lo, CDT, HAS_MARGIN, HAS_SCALE, True)
        tf = (offset_ptr, margin, cap, inv_cap, lscale)
        scale = scale * lscale  # as below
        if ALIGN > 1:
            stride_q = _aligned(stride_q, ALIGN)
        z_rows = logits_ptr + rows * stride_z
        g_rows = grad_ptr + rows * stride_g
        q_rows = target_ptr + rows * stride_q
        ones = tl.full([ROWS], 1.0, CDT)  # the row weight of class mode
        if SPLIT:
            cols_per_split = _aligned(cols_per_split, BLOCK_C)
            col_lo = tl.program_id(1) * cols_per_split
            col_hi = tl.minimum(col_lo + cols_per_split, n_cols)
            ws_rows = ws_ptr + (rows * tl.num_programs(1) + tl.program_id(1)) * WS_DENSE
        else:
            col_lo = 0
            col_hi = n_cols
        if (LOSS_TYPE == SOFTMAX) or (LOSS_TYPE == SOFTMAX_FOCAL):
            if SINGLE_TILE:
                cols = tl.arange(0, BLOCK_C)
                col_ok = cols < n_cols
                mask = row_ok[:, None] & col_ok[None, :]
                q = _load_q(q_rows[:, None], cols[None, :], mask, CDT)
                w = _load_w(weight_ptr, cols, col_ok, CDT)
                z, dz = _transform(_load_z(z_rows[:, None], cols[None, :], mask, CDT), cols[None, :],
                                   col_ok[None, :], q, tf, HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN, True)
                m = tl.max(tl.where(mask, z, float("-inf")), axis=1)
                shift = _finite_or_zero(m)
                e = tl.where(mask, _exp(z - shift[:, None]), 0.0)
                at_max = mask & (z == m[:, None])
                lse_gap, s, x = _lse_gap(tl.sum(at_max.to(CDT), axis=1), tl.sum(tl.where(at_max, 0.0, e), axis=1))
                if CLASS_WEIGHTS:
                    a = ones
                else:
                    a = _sample_weight(tl.sum(w * q, axis=1), tl.sum(q, axis=1))
                loss, big_k, k = _dense_softmax_terms(z, q, w, mask, shift, lse_gap, eps, eps_c, gamma,
                                                      LOSS_TYPE, GAMMA_CASE, HAS_SMOOTHING, CLASS_WEIGHTS)
                if LOSS_TYPE == SOFTMAX:
                    loss += big_k * lse_gap
                row, coef, z_term, kz = _dense_row(loss, a, scale, shift, lse_gap, z_loss, HAS_ZLOSS)
                tl.store(loss_ptr + rows, row, mask=row_ok)
                if HAS_ZLOSS:
                    tl.store(zrows_ptr + rows, z_term, mask=row_ok & _per_row(rows, store_z))
                if HAS_GRAD:
                    g = _dense_softmax_grad(e, s, x, big_k, k, coef, kz, HAS_ZLOSS)
                    _store_grad(g_rows[:, None], cols[None, :], g, dz, row_ok[:, None], mask, HAS_SOFTCAP)
            else:
                m, n_max, s_other, t, big_k, wq, sq = _dense_softmax_stats(
                    z_rows, q_rows, weight_ptr, row_ok, col_lo, col_hi, tf, eps, eps_c, CDT, LOSS_TYPE,
                    HAS_SMOOTHING, CLASS_WEIGHTS, HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN, ROWS, BLOCK_C)
                if SPLIT:
                    tl.store(ws_rows, m, mask=row_ok)
                    tl.store(ws_rows + 1, s_other, mask=row_ok)
                    tl.store(ws_rows + 2, n_max, mask=row_ok)
                    if LOSS_TYPE == SOFTMAX:
                        tl.store(ws_rows + 3, t, mask=row_ok)
                        tl.store(ws_rows + 4, big_k, mask=row_ok)
                    if not CLASS_WEIGHTS:
                        tl.store(ws_rows + 5, wq, mask=row_ok)
                        tl.store(ws_rows + 6, sq, mask=row_ok)
                else:
                    shift = _finite_or_zero(m)
                    lse_gap, s, x = _lse_gap(n_max, s_other)
                    if CLASS_WEIGHTS:
                        a = ones
                    else:
                        a = _sample_weight(wq, sq)
                    if LOSS_TYPE == SOFTMAX:
                        loss = t + big_k * lse_gap
                    else:
                        loss, big_k = _dense_focal_sums(z_rows, q_rows, weight_ptr, row_ok, shift, lse_gap, gamma,
                                                        col_lo, col_hi, tf, CDT, GAMMA_CASE, CLASS_WEIGHTS,
                                                        HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN, ROWS, BLOCK_C)
                    row, coef, z_term, kz = _dense_row(loss, a, scale, shift, lse_gap, z_loss, HAS_ZLOSS)
                    tl.store(loss_ptr + rows, row, mask=row_ok)
                    if HAS_ZLOSS:
                        tl.store(zrows_ptr + rows, z_term, mask=row_ok & _per_row(rows, store_z))
                    if HAS_GRAD:
                        _dense_softmax_grad_pass(z_rows, q_rows, g_rows, weight_ptr, row_ok, m, s, x, lse_gap,
                                                 big_k, coef, kz, eps, eps_c, gamma, col_lo, col_hi, tf, CDT,
                                                 LOSS_TYPE, GAMMA_CASE, HAS_SMOOTHING, CLASS_WEIGHTS, HAS_ZLOSS,
                                                 HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN, BLOCK_C)
        else:
            # Sample mode needs a_i before the gradient this pass writes: from the tile itself on a single tile,
            # else from a pass over q alone (q read twice, the logits once; two passes over both would read the
            # logits twice), on the split path from the mass partials (each chunk sees only its own columns).
            if CLASS_WEIGHTS or SINGLE_TILE:
                a = ones
            elif SPLIT:
                a = _split_sample_weight(rw_ptr, rows, row_ok, tl.num_programs(1))
            else:
                wq, sq = _mass_sums(q_rows, weight_ptr, row_ok, col_lo, col_hi, CDT, ROWS, BLOCK_C)
                a = _sample_weight(wq, sq)
            acc = _dense_one_vs_all_pass(z_rows, q_rows, g_rows, weight_ptr, row_ok, a, scale, gamma, col_lo,
                                         col_hi, tf, CDT, LOSS_TYPE, GAMMA_CASE, HAS_GRAD, CLASS_WEIGHTS,
                                         SINGLE_TILE and not CLASS_WEIGHTS, HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN,
                                         ROWS, BLOCK_C)
            if SPLIT:
                tl.store(ws_rows, acc, mask=row_ok)
            else:
                tl.store(loss_ptr + rows, acc, mask=row_ok)
    else:
        row_ok, y, valid, hit, a, scale, gamma, eps = _row_setup(
            target_ptr, weight_ptr, scale_ptr, rows, n_rows, n_cols, ignore_index, gamma_hi, gamma_lo, eps_hi, eps_lo,
            CDT)
        m_y, cap, inv_cap, lscale, z_loss = _transform_setup(
            margin_ptr, y, hit, cap_hi, cap_lo, inv_cap_hi, inv_cap_lo, lscale_hi, lscale_lo, zloss_hi, zloss_lo, CDT,
            HAS_MARGIN, HAS_SCALE)
        tf = (offset_ptr, m_y, cap, inv_cap, lscale)
        tf_tile = _tile_tf(tf)
        scale = scale * lscale  # dz'/dz = lscale (times sech^2 with softcap): folded into every row coefficient
        z_rows = logits_ptr + rows * stride_z
        g_rows = grad_ptr + rows * stride_g
        if SPLIT:
            cols_per_split = _aligned(cols_per_split, BLOCK_C)  # a whole number of tiles: aligned chunk starts
            col_lo = tl.program_id(1) * cols_per_split
            col_hi = tl.minimum(col_lo + cols_per_split, n_cols)
            ws_rows = ws_ptr + (rows * tl.num_programs(1) + tl.program_id(1)) * 4
        else:
            col_lo = 0
            col_hi = n_cols

        if (LOSS_TYPE == SOFTMAX) or (LOSS_TYPE == SOFTMAX_FOCAL):
            zy, _ = _transform(_load_z(z_rows, y, hit, CDT), y, hit, hit, tf, HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN)
            if SINGLE_TILE:
                cols = tl.arange(0, BLOCK_C)
                col_ok = cols < n_cols
                mask = row_ok[:, None] & col_ok[None, :]
                is_t = cols[None, :] == y[:, None]
                # The softcap's factor dz stays in registers with the tile: the logits may be overwritten below.
                z, dz = _transform(_load_z(z_rows[:, None], cols[None, :], mask, CDT), cols[None, :], col_ok[None, :],
                                   is_t, tf_tile, HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN)
                m = tl.max(tl.where(mask, z, float("-inf")), axis=1)
                e = tl.where(mask, _exp(z - _finite_or_zero(m)[:, None]), 0.0)
                so = tl.sum(tl.where(is_t, 0.0, e), axis=1)
                if HAS_SMOOTHING:
                    sz = tl.sum(z, axis=1)
                else:
                    sz = so
                loss, coef, s, one_minus_p, z_term, kz = _softmax_row(
                    m, so, sz, zy, a, valid, scale, n_cols, gamma, eps, z_loss, LOSS_TYPE, GAMMA_CASE, HAS_SMOOTHING,
                    HAS_ZLOSS)
                tl.store(loss_ptr + rows, loss, mask=row_ok)
                if HAS_ZLOSS:
                    tl.store(zrows_ptr + rows, z_term, mask=row_ok & _per_row(rows, store_z))
                if HAS_GRAD:
                    g = _softmax_grad(e * _div_rn(1.0, s)[:, None], is_t, coef, valid, eps, n_cols, one_minus_p, kz,
                                      HAS_SMOOTHING, HAS_ZLOSS)
                    _store_grad(g_rows[:, None], cols[None, :], g, dz, valid[:, None], mask, HAS_SOFTCAP)
            else:
                m, so, sz = _softmax_stats(z_rows, row_ok, y, col_lo, col_hi, tf_tile, CDT, HAS_SMOOTHING,
                                           HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN, ROWS, BLOCK_C)
                if SPLIT:
                    tl.store(ws_rows, m, mask=row_ok)
                    tl.store(ws_rows + 1, so, mask=row_ok)
                    tl.store(ws_rows + 2, sz, mask=row_ok)
                    tl.store(ws_rows + 3, zy, mask=row_ok)
                else:
                    loss, coef, s, one_minus_p, z_term, kz = _softmax_row(
                        m, so, sz, zy, a, valid, scale, n_cols, gamma, eps, z_loss, LOSS_TYPE, GAMMA_CASE,
                        HAS_SMOOTHING, HAS_ZLOSS)
                    tl.store(loss_ptr + rows, loss, mask=row_ok)
                    if HAS_ZLOSS:
                        tl.store(zrows_ptr + rows, z_term, mask=row_ok & _per_row(rows, store_z))
                    if HAS_GRAD:
                        _softmax_grad_pass(z_rows, g_rows, row_ok, y, m, s, one_minus_p, coef, kz, valid, eps, n_cols,
                                           col_lo, col_hi, tf_tile, CDT, HAS_SMOOTHING, HAS_ZLOSS, HAS_SOFTCAP,
                                           HAS_OFFSET, HAS_MARGIN, BLOCK_C)
        else:
            coef = tl.where(valid, a * scale, 0.0)
            acc = _one_vs_all_pass(z_rows, g_rows, row_ok, y, valid, coef, gamma, col_lo, col_hi, tf_tile,
                                   CDT, LOSS_TYPE, GAMMA_CASE, HAS_GRAD, HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN, ROWS,
                                   BLOCK_C)
            if SPLIT:
                tl.store(ws_rows, acc, mask=row_ok)
            else:
                tl.store(loss_ptr + rows, tl.where(valid, a * acc, 0.0), mask=row_ok)


@jit
def cb_loss_split_finish_kernel(
    logits_ptr, target_ptr, weight_ptr, scale_ptr, loss_ptr, grad_ptr, ws_ptr, offset_ptr, margin_ptr, zrows_ptr,
    n_rows, n_cols, stride_z, stride_g, cols_per_split, n_splits,
    ignore_index, gamma_hi, gamma_lo, eps_hi, eps_lo,
    cap_hi, cap_lo, inv_cap_hi, inv_cap_lo, lscale_hi, lscale_lo, zloss_hi, zloss_lo, store_z, stride_q, rw_ptr,
    LOSS_TYPE: tl.constexpr, GAMMA_CASE: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_GRAD: tl.constexpr,
    MAX_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    HAS_SCALE: tl.constexpr, DENSE: tl.constexpr = False, CLASS_WEIGHTS: tl.constexpr = False,
    FOCAL_SUMS: tl.constexpr = False,
):
    """Second launch of the split path: program (r, k) combines row r's ``n_splits`` partials in a fixed order,
    then (softmax losses) writes the gradient of chunk k; chunk 0 writes the loss (and the z-loss term). The
    partials hold transformed statistics (the target logit too); the gradient pass reads its chunk's raw logits.
    DENSE softmax focal takes one launch more, first, with FOCAL_SUMS: it leaves chunk k's loss and ``S`` partials
    (which need lse) in the workspace for this launch's gradient. ``rw_ptr`` is cb_loss_kernel's, unused here."""
    CDT: tl.constexpr = loss_ptr.dtype.element_ty
    if ALIGN > 1:
        n_cols = _aligned(n_cols, ALIGN)
        stride_z = _aligned(stride_z, ALIGN)
        stride_g = _aligned(stride_g, ALIGN)
    rows = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)  # int64: see cb_loss_kernel
    split = tl.program_id(1)
    if DENSE:
        row_ok, scale, gamma, eps, eps_c = _dense_row_setup(scale_ptr, rows, n_rows, n_cols, gamma_hi, gamma_lo,
                                                            eps_hi, eps_lo, CDT)
        k = tl.arange(0, MAX_SPLITS)
        kmask = row_ok[:, None] & (k < n_splits)[None, :]
        parts = ws_ptr + (rows[:, None] * n_splits + k[None, :]) * WS_DENSE
        if (LOSS_TYPE == SOFTMAX) or (LOSS_TYPE == SOFTMAX_FOCAL):
            margin, cap, inv_cap, lscale, z_loss = _transform_setup(
                margin_ptr, rows, row_ok, cap_hi, cap_lo, inv_cap_hi, inv_cap_lo, lscale_hi, lscale_lo, zloss_hi,
                zloss_lo, CDT, HAS_MARGIN, HAS_SCALE, True)
            tf = (offset_ptr, margin, cap, inv_cap, lscale)
            scale = scale * lscale
            if ALIGN > 1:
                stride_q = _aligned(stride_q, ALIGN)
            pm = tl.load(parts, mask=kmask, other=float("-inf"))
            m = tl.max(pm, axis=1)
            shift = _finite_or_zero(m)
            # A chunk below the row's max contributes its max logits to the others.
            ps = tl.load(parts + 1, mask=kmask, other=0.0)
            pn = tl.load(parts + 2, mask=kmask, other=0.0)
            top = pm == m[:, None]
            lse_gap, s, x = _lse_gap(tl.sum(tl.where(top, pn, 0.0), axis=1),
                                  tl.sum(tl.where(top, ps, (ps + pn) * _exp(pm - shift[:, None])), axis=1))
            cols_per_split = _aligned(cols_per_split, BLOCK_C)
            col_lo = split * cols_per_split
            col_hi = tl.minimum(col_lo + cols_per_split, n_cols)
            z_rows = logits_ptr + rows * stride_z
            q_rows = target_ptr + rows * stride_q
            if FOCAL_SUMS:
                loss, big_s = _dense_focal_sums(z_rows, q_rows, weight_ptr, row_ok, shift, lse_gap, gamma, col_lo,
                                                col_hi, tf, CDT, GAMMA_CASE, CLASS_WEIGHTS, HAS_SOFTCAP, HAS_OFFSET,
                                                HAS_MARGIN, 1, BLOCK_C)
                own = ws_ptr + (rows * n_splits + split) * WS_DENSE
                tl.store(own + 3, loss, mask=row_ok)
                tl.store(own + 4, big_s, mask=row_ok)
            else:
                if CLASS_WEIGHTS:
                    a = tl.full([1], 1.0, CDT)
                else:
                    a = _sample_weight(tl.sum(tl.load(parts + 5, mask=kmask, other=0.0), axis=1),
                                       tl.sum(tl.load(parts + 6, mask=kmask, other=0.0), axis=1))
                # Softmax: each chunk's T is relative to its own max; moved up to the row's, every term stays >= 0.
                # Softmax focal: the middle launch's F and S in the same slots.
                pk = tl.load(parts + 4, mask=kmask, other=0.0)
                pt = tl.load(parts + 3, mask=kmask, other=0.0)
                if LOSS_TYPE == SOFTMAX:
                    pt += pk * (shift[:, None] - _finite_or_zero(pm))
                big_k = tl.sum(pk, axis=1)
                loss = tl.sum(pt, axis=1)
                if LOSS_TYPE == SOFTMAX:
                    loss += big_k * lse_gap
                row, coef, z_term, kz = _dense_row(loss, a, scale, shift, lse_gap, z_loss, HAS_ZLOSS)
                first = (split + tl.arange(0, 1)) == 0
                tl.store(loss_ptr + rows, row, mask=row_ok & first)
                if HAS_ZLOSS:
                    tl.store(zrows_ptr + rows, z_term, mask=row_ok & first & _per_row(rows, store_z))
                if HAS_GRAD:
                    _dense_softmax_grad_pass(z_rows, q_rows, grad_ptr + rows * stride_g, weight_ptr, row_ok, m, s,
                                             x, lse_gap, big_k, coef, kz, eps, eps_c, gamma, col_lo, col_hi, tf, CDT,
                                             LOSS_TYPE, GAMMA_CASE, HAS_SMOOTHING, CLASS_WEIGHTS, HAS_ZLOSS,
                                             HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN, BLOCK_C)
        else:
            # The first launch's partials already carry a_i (and cw_j).
            tl.store(loss_ptr + rows, tl.sum(tl.load(parts, mask=kmask, other=0.0), axis=1), mask=row_ok)
    else:
        row_ok, y, valid, hit, a, scale, gamma, eps = _row_setup(
            target_ptr, weight_ptr, scale_ptr, rows, n_rows, n_cols, ignore_index, gamma_hi, gamma_lo, eps_hi, eps_lo,
            CDT)
        k = tl.arange(0, MAX_SPLITS)
        kmask = row_ok[:, None] & (k < n_splits)[None, :]
        parts = ws_ptr + (rows[:, None] * n_splits + k[None, :]) * 4
        if (LOSS_TYPE == SOFTMAX) or (LOSS_TYPE == SOFTMAX_FOCAL):
            m_y, cap, inv_cap, lscale, z_loss = _transform_setup(
                margin_ptr, y, hit, cap_hi, cap_lo, inv_cap_hi, inv_cap_lo, lscale_hi, lscale_lo, zloss_hi, zloss_lo,
                CDT, HAS_MARGIN, HAS_SCALE)
            scale = scale * lscale  # see cb_loss_kernel
            pm = tl.load(parts, mask=kmask, other=float("-inf"))
            ps = tl.load(parts + 1, mask=kmask, other=0.0)
            m = tl.max(pm, axis=1)
            so = tl.sum(ps * _exp(pm - _finite_or_zero(m)[:, None]), axis=1)
            if HAS_SMOOTHING:
                sz = tl.sum(tl.load(parts + 2, mask=kmask, other=0.0), axis=1)
            else:
                sz = so
            zy = tl.load(ws_ptr + rows * n_splits * 4 + 3, mask=row_ok, other=0.0)
            loss, coef, s, one_minus_p, z_term, kz = _softmax_row(
                m, so, sz, zy, a, valid, scale, n_cols, gamma, eps, z_loss, LOSS_TYPE, GAMMA_CASE, HAS_SMOOTHING,
                HAS_ZLOSS)
            first = (split + tl.arange(0, 1)) == 0  # a [1] mask: the interpreter rejects a broadcast scalar one
            tl.store(loss_ptr + rows, loss, mask=row_ok & first)
            if HAS_ZLOSS:
                tl.store(zrows_ptr + rows, z_term, mask=row_ok & first & _per_row(rows, store_z))
            if HAS_GRAD:
                cols_per_split = _aligned(cols_per_split, BLOCK_C)  # see cb_loss_kernel
                col_lo = split * cols_per_split
                col_hi = tl.minimum(col_lo + cols_per_split, n_cols)
                _softmax_grad_pass(logits_ptr + rows * stride_z, grad_ptr + rows * stride_g, row_ok, y, m, s,
                                   one_minus_p, coef, kz, valid, eps, n_cols, col_lo, col_hi,
                                   _tile_tf((offset_ptr, m_y, cap, inv_cap, lscale)), CDT, HAS_SMOOTHING, HAS_ZLOSS,
                                   HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN, BLOCK_C)
        else:
            acc = tl.sum(tl.load(parts, mask=kmask, other=0.0), axis=1)
            tl.store(loss_ptr + rows, tl.where(valid, a * acc, 0.0), mask=row_ok)
