// Fused dequant-GEMV/GEMM over PoT and INT codes in the tile layout of layout.rs, for
// sm_80+ (mma.sync m16n8k16, f16 inputs, f32 accumulation). Compiled at run time by NVRTC;
// no headers: half-precision arithmetic is written in PTX.
//
// Y[tok][row] = sum_k W[row][k] * X[tok][k]; X [B][K] and Y [B][N] in f16 or f32 (`Io`).
// A block owns MR row tiles (16·MR rows); its KS warps split the K tiles between them (warp w
// takes tiles w, w+KS, ...) and add their partial sums in shared memory at the end. A warp
// keeps U tiles in flight in registers: when it has used a tile, it loads the one U ahead
// into the same registers (or, `qgemv_async_body`, in a ring of shared-memory stages); for
// one token the activations may wait in shared memory instead (`stage_x`). Each lane decodes
// its pairs of weights straight into the A fragments of the mma, unscaled: PoT as
// 0x4000·0x10001 | fields (±2^(1+E), one lop3 after the rotation), INT as
// (fields | 0x6400·0x10001) − (1024 + z) (the exact q − z). The group scale multiplies each
// tile's f32 partial sums.

__device__ __forceinline__ u32 rotl(u32 x, int r) {
    return r == 0 ? x : __funnelshift_l(x, x, r);
}

__device__ __forceinline__ constexpr u32 rotr_const(u32 x, int r) {
    return r == 0 ? x : (x >> r) | (x << (32 - r));
}

// The codes stream through once: no L1 allocation.
__device__ __forceinline__ u32 ld_stream(const u32* p) {
    u32 v;
    asm volatile("ld.global.nc.L1::no_allocate.b32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ uint2 ld_stream2(const u32* p) {
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

__device__ __forceinline__ uint4 ld_stream4(const u32* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Scales and activations are re-read by other warps and blocks: cached.
__device__ __forceinline__ u32 ld_nc(const u32* p) {
    u32 v;
    asm volatile("ld.global.nc.b32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ uint4 ld_nc4(const u32* p) {
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Any bitwise function of three words in one instruction: LUT is its truth table over
// a = 0xF0, b = 0xCC, c = 0xAA. Written out because the compiler splits `(x & m) | k` with
// two constants into two.
template <u32 LUT>
__device__ __forceinline__ u32 lop3(u32 a, u32 b, u32 c) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
    return d;
}
constexpr u32 SELECT = 0xE2;   // (a & b) | (c & ~b)
constexpr u32 MASK_OR = 0xEA;  // (a & b) | c

__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
    u32 d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ float f16lo_to_f32(u32 v) {
    float f;
    asm("{ .reg .b16 lo, hi; mov.b32 {lo, hi}, %1; cvt.f32.f16 %0, lo; }" : "=f"(f) : "r"(v));
    return f;
}

__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Brings the bits of MASK rotated right by r back to MASK (layout.rs `field_move`): a left
// shift when none wraps around, written as a multiply so that it runs on the FMA pipe beside
// the ALU's lop3s, else a rotation.
template <u32 MASK>
__device__ __forceinline__ u32 move_fields(u32 x, int r) {
    const u32 at = rotr_const(MASK, r);
    if (r == 0) return x;
    if (((at << r) >> r) == at) return x * (1u << r);
    return rotl(x, r);
}

// Pair p's fields OR-ed into `base` (layout.rs: planes, rotations, masks; `kernel_fields`
// is this on the CPU): both planes' bits selected into one word (one lop3), moved into place
// once, then one lop3 that masks and decodes. `w2r` is the 1-bit plane of 3-bit codes
// rotated by one, for pairs 8..16.
template <int BITS, bool POT>
__device__ __forceinline__ u32 decode_fields(const u32 (&w)[BITS], u32 w2r, int p, u32 base) {
    const u32 MA = POT ? (BITS == 2 ? 0x84008400u : 0x0C000C00u) : 0x00030003u;
    const u32 MB = BITS == 2 ? 0u : BITS == 3 ? (POT ? 0x80008000u : 0x00040004u) : (POT ? 0x90009000u : 0x000C000Cu);
    const int r = 2 * (p & 7);
    u32 word = w[p >> 3];
    if (BITS != 2) {
        const u32 hi = BITS == 4 ? w[(2 + (p >> 3)) % BITS] : (p < 8 ? w[BITS - 1] : w2r);
        word = lop3<SELECT>(word, rotr_const(MA, r), hi);
    }
    return lop3<MASK_OR>(move_fields<(MA | MB)>(word, r), MA | MB, base);
}

// The group parameters of a lane's two rows (g and g + 8) from their meta words (layout.rs):
// the scales as f32 (PoT: s/2) and, INT, the f16 pair (1024 + z)·0x10001.
template <bool POT>
struct RowScales {
    float s[2];
    u32 z[2];
    __device__ __forceinline__ RowScales(u32 lo, u32 hi) {
        s[0] = POT ? __uint_as_float(lo) : f16lo_to_f32(lo);
        s[1] = POT ? __uint_as_float(hi) : f16lo_to_f32(hi);
        z[0] = POT ? 0u : __byte_perm(lo, 0u, 0x3232);
        z[1] = POT ? 0u : __byte_perm(hi, 0u, 0x3232);
    }
};

// Pair p as two unscaled f16 weights (row g + 8·(p & 1)): PoT ±2^(1+E), INT the exact q − z.
template <int BITS, bool POT>
__device__ __forceinline__ u32 decode_pair(const u32 (&w)[BITS], u32 w2r, int p, const RowScales<POT>& rs) {
    const u32 h = decode_fields<BITS, POT>(w, w2r, p, POT ? 0x40004000u : 0x64006400u);
    return POT ? h : hsub2(h, rs.z[p & 1]);
}

// A lane's code words of one tile, from `wp` (its run in the tile, layout.rs `word_offset`).
template <int BITS>
__device__ __forceinline__ void load_words(u32 (&w)[BITS], const u32* wp) {
    if (BITS == 4) {
        const uint4 v = ld_stream4(wp);
        w[0] = v.x; w[1] = v.y; w[2 % BITS] = v.z; w[3 % BITS] = v.w;
    } else {
        const uint2 v = ld_stream2(wp);
        w[0] = v.x; w[1] = v.y;
        // The 1-bit plane: 64 words after the tile's 2-bit plane, back from this lane's pair.
        if (BITS == 3) w[2 % BITS] = ld_stream(wp + 64 - (threadIdx.x & 31));
    }
}

// The group of K tile kt: a shift when the tiles per group are a power of two.
__device__ __forceinline__ int group_of(int kt, int group_shift, int tiles_per_group) {
    return group_shift >= 0 ? kt >> group_shift : kt / tiles_per_group;
}

// What a warp of a product block needs to know about its share: K tiles kt = warp + j·KS for
// j < count, of row tiles rt0.., whose scales for this lane's rows start at meta_rows.
template <int BITS, int MR, int KS>
struct Share {
    int warp, lane, g, t, ktiles, rt0, count, group_shift;
    size_t row_tile_words;
    __device__ __forceinline__ Share(int K, int tiles_per_group) {
        warp = threadIdx.x >> 5;
        lane = threadIdx.x & 31;
        g = lane >> 2;
        t = lane & 3;
        ktiles = K >> 6;
        rt0 = blockIdx.x * MR;
        count = ktiles > warp ? (ktiles - warp + KS - 1) / KS : 0;
        group_shift = (tiles_per_group & (tiles_per_group - 1)) == 0 ? __ffs(tiles_per_group) - 1 : -1;
        row_tile_words = (size_t)ktiles * BITS * 32;
    }
    // This lane's code run in the warp's first tile.
    __device__ __forceinline__ const u32* first_words(const u32* W) const {
        return W + rt0 * row_tile_words + (size_t)warp * BITS * 32 + (BITS == 4 ? 4 : 2) * lane;
    }
};

// One K tile of MR row tiles as a warp holds it: each lane's code words and the scales of
// its two rows; for one token tile, the lane's 16 activations too (more token tiles load
// theirs when the tile is used: `x` is then unused and costs no registers).
template <int BITS, int MR, int NT>
struct Tile {
    u32 w[MR][BITS];
    u32 meta[MR][2];
    u32 x[8];
};

// The activations X [B][K] and outputs Y [B][N]: f16, or f32 where the flags say so (a model
// in f32 then needs no conversions around the product). Bit 0: X is f32; bit 1: Y is f32.
struct Io {
    const void* x;
    void* y;
    int flags;
    __device__ __forceinline__ bool x_f32() const { return flags & 1; }
    __device__ __forceinline__ bool y_f32() const { return flags & 2; }
};

// Lane t's 16 activations of a tile for one token, as eight f16 pairs, from element `at` of X.
__device__ __forceinline__ void load_x(u32 (&x)[8], const Io& io, size_t at) {
    if (io.x_f32()) {
        const u32* p = (const u32*)io.x + at;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const uint4 v = ld_nc4(p + 4 * i);
            x[2 * i] = pack_f16x2(__uint_as_float(v.x), __uint_as_float(v.y));
            x[2 * i + 1] = pack_f16x2(__uint_as_float(v.z), __uint_as_float(v.w));
        }
    } else {
        const u32* p = (const u32*)((const u16*)io.x + at);
        const uint4 a = ld_nc4(p), b = ld_nc4(p + 4);
        x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
        x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
    }
}

// Where a warp's next K tile is: its codes (row tile rt0), its index, and for one token tile
// the element of X where the lane's activations start. Advanced by KS tiles after each load.
struct Cursor {
    const u32* w;
    size_t x;
    int kt;
};

template <int BITS, int MR, int NT, int KS>
__device__ __forceinline__ void load_tile(Tile<BITS, MR, NT>& tl, Cursor& c, const Io& io, const u32* __restrict__ meta_rows,
                                          size_t row_tile_words, int N, int group_shift, int tiles_per_group, bool with_x = true) {
    const int grp = group_of(c.kt, group_shift, tiles_per_group);
#pragma unroll
    for (int m = 0; m < MR; m++) {
        load_words<BITS>(tl.w[m], c.w + m * row_tile_words);
        const u32* mp = meta_rows + (size_t)grp * N + m * 16;
        tl.meta[m][0] = ld_nc(mp);
        tl.meta[m][1] = ld_nc(mp + 8);
    }
    if (NT == 1 && with_x) load_x(tl.x, io, c.x);
    c.w += KS * BITS * 32;
    c.x += KS * 64;
    c.kt += KS;
}

// With more than one token tile, the activations are loaded here (lane t's start at column
// 16·t of the tile), and a lane whose token is past the last reads the last token's (its
// products land in output columns that are never stored).
template <int BITS, bool POT, int MR, int NT, bool XS = false>
__device__ __forceinline__ void compute_tile(float (&acc)[MR][NT][4], const Tile<BITS, MR, NT>& tl, const Io& io,
                                             int K, int B, int g, int t, int kt, const u32* xs = nullptr) {
    u32 xb[NT][8];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        if (XS) {
            const uint4 a = *(const uint4*)(xs + kt * 32 + 8 * t), b = *(const uint4*)(xs + kt * 32 + 8 * t + 4);
            xb[nt][0] = a.x; xb[nt][1] = a.y; xb[nt][2] = a.z; xb[nt][3] = a.w;
            xb[nt][4] = b.x; xb[nt][5] = b.y; xb[nt][6] = b.z; xb[nt][7] = b.w;
        } else if (NT == 1) {
#pragma unroll
            for (int i = 0; i < 8; i++) xb[nt][i] = tl.x[i];
        } else {
            load_x(xb[nt], io, (size_t)min(nt * 8 + g, B - 1) * K + kt * 64 + 16 * t);
        }
    }
#pragma unroll
    for (int m = 0; m < MR; m++) {
        const RowScales<POT> rs(tl.meta[m][0], tl.meta[m][1]);
        const u32 w2r = BITS == 3 ? rotl(tl.w[m][2 % BITS], 1) : 0u;
        float d[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int j = 0; j < 4; j++) d[nt][j] = 0.f;
#pragma unroll
        for (int step = 0; step < 4; step++) {
            u32 a[4];
#pragma unroll
            for (int reg = 0; reg < 4; reg++) a[reg] = decode_pair<BITS, POT>(tl.w[m], w2r, step * 4 + reg, rs);
#pragma unroll
            for (int nt = 0; nt < NT; nt++) mma16816(d[nt], a, xb[nt][2 * step], xb[nt][2 * step + 1]);
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            acc[m][nt][0] = fmaf(rs.s[0], d[nt][0], acc[m][nt][0]);
            acc[m][nt][1] = fmaf(rs.s[0], d[nt][1], acc[m][nt][1]);
            acc[m][nt][2] = fmaf(rs.s[1], d[nt][2], acc[m][nt][2]);
            acc[m][nt][3] = fmaf(rs.s[1], d[nt][3], acc[m][nt][3]);
        }
    }
}

// The KS warps' partial sums added in shared memory (`red`: KS · MR · NT · 128 floats) and
// stored in `io`'s output type.
template <int MR, int NT, int KS>
__device__ __forceinline__ void reduce_store(const float (&acc)[MR][NT][4], float* red, const Io& io, int N, int B, int rt0) {
    constexpr int E = MR * NT * 4 * 32;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int m = 0; m < MR; m++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int j = 0; j < 4; j++) red[warp * E + ((m * NT + nt) * 4 + j) * 32 + lane] = acc[m][nt][j];
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += 32 * KS) {
        float s = 0.f;
#pragma unroll
        for (int w2 = 0; w2 < KS; w2++) s += red[w2 * E + e];
        const int l = e & 31, j = (e >> 5) & 3, nt = (e >> 7) % NT, m = (e >> 7) / NT;
        const int row = (rt0 + m) * 16 + (l >> 2) + 8 * (j >> 1);
        const int tok = nt * 8 + 2 * (l & 3) + (j & 1);
        if (tok < B) {
            if (io.y_f32())
                ((float*)io.y)[(size_t)tok * N + row] = s;
            else
                ((u16*)io.y)[(size_t)tok * N + row] = f32_to_f16(s);
        }
    }
}

// One token's activations (B = 1) as f16 in shared memory, `xs` (K/2 words): copied once by
// the whole block, so that the tiles in flight hold only codes and scales.
__device__ __forceinline__ void stage_x(u32* xs, const Io& io, int K) {
    for (int i = threadIdx.x; i < K / 16; i += blockDim.x) {
        u32 v[8];
        load_x(v, io, (size_t)16 * i);
        *(uint4*)(xs + 8 * i) = make_uint4(v[0], v[1], v[2], v[3]);
        *(uint4*)(xs + 8 * i + 4) = make_uint4(v[4], v[5], v[6], v[7]);
    }
    __syncthreads();
}

template <int BITS, bool POT, int MR, int NT, int KS, int U, bool XS = false>
__device__ __forceinline__ void qgemm_body(const u32* __restrict__ W, const u32* __restrict__ meta, const Io io,
                                           int N, int K, int B, int tiles_per_group) {
    const Share<BITS, MR, KS> sh(K, tiles_per_group);
    const int warp = sh.warp, g = sh.g, count = sh.count, group_shift = sh.group_shift, rt0 = sh.rt0;
    const size_t row_tile_words = sh.row_tile_words;
    const u32* meta_rows = meta + rt0 * 16 + g;
    Cursor next{sh.first_words(W), (size_t)min(g, B - 1) * K + warp * 64 + 16 * sh.t, warp};

    float acc[MR][NT][4];
#pragma unroll
    for (int m = 0; m < MR; m++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[m][nt][j] = 0.f;

    Tile<BITS, MR, NT> tl[U];
    const size_t x0 = next.x;
#pragma unroll
    for (int u = 0; u < U; u++)
        if (u < count) load_tile<BITS, MR, NT, KS>(tl[u], next, io, meta_rows, row_tile_words, N, group_shift, tiles_per_group, false);
    // Dependent launch (common.cuh): the codes and scales, which nothing writes, are loaded
    // first; the activations, which the previous launch may write, and the outputs only after
    // it is done. The next product's first loads overlap this one's last tiles and reduction.
    let_next_launch_start();
    wait_for_previous_launch();
    extern __shared__ u32 xs[];
    if (XS) stage_x(xs, io, K);
#pragma unroll
    for (int u = 0; u < U; u++)
        if (NT == 1 && !XS && u < count) load_x(tl[u].x, io, x0 + (size_t)u * KS * 64);
    for (int j0 = 0; j0 < count; j0 += U) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int j = j0 + u;
            if (j < count) {
                compute_tile<BITS, POT, MR, NT, XS>(acc, tl[u], io, K, B, g, sh.t, warp + j * KS, xs);
                if (j + U < count) load_tile<BITS, MR, NT, KS>(tl[u], next, io, meta_rows, row_tile_words, N, group_shift, tiles_per_group, !XS);
            }
        }
    }

    constexpr int E = MR * NT * 4 * 32;
    __shared__ float red[KS * E];
    reduce_store<MR, NT, KS>(acc, red, io, N, B, rt0);
}


// cp.async (global → shared, bypassing registers) for the single-token-tile products: a lane
// copies its own codes and scales of the next tiles into its own slots of a ring of S stages
// and reads back only those, so no barrier is needed; S − 1 tiles per warp stay in flight at
// no register cost.
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
template <int BYTES>
__device__ __forceinline__ void cp_async(u32 dst, const void* src) {
    if (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(dst), "l"(src), "n"(BYTES));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

template <int BITS, bool POT, int MR, int KS, int S>
__device__ __forceinline__ void qgemv_async_body(const u32* __restrict__ W, const u32* __restrict__ meta, const Io io,
                                                 int N, int K, int B, int tiles_per_group) {
    // Dynamic shared memory (gpu.rs sizes it): per warp, stage, row tile and lane, a run of RW
    // code words, [the third word of 3-bit codes,] two scales; then the reduction.
    extern __shared__ u32 smem[];
    constexpr int RW = BITS == 4 ? 4 : 2;  // words a lane copies as one run per tile
    const Share<BITS, MR, KS> sh(K, tiles_per_group);
    const int warp = sh.warp, lane = sh.lane, g = sh.g, count = sh.count, rt0 = sh.rt0;
    const size_t row_tile_words = sh.row_tile_words;
    const size_t x_lane = (size_t)min(g, B - 1) * K + 16 * sh.t;
    const u32* meta_rows = meta + rt0 * 16 + g;
    // This lane's slots: codes [stage][m] (RW words), the 3-bit third word, scales (2 words).
    u32* runs = smem + (warp * S * MR * 32 + lane) * RW;
    u32* thirds = smem + KS * S * MR * 32 * RW + warp * S * MR * 32 + lane;
    u32* scales = smem + KS * S * MR * 32 * (BITS == 3 ? 3 : RW) + (warp * S * MR * 32 + lane) * 2;
    const u32 runs_at = smem_addr(runs), thirds_at = smem_addr(thirds), scales_at = smem_addr(scales);
    const u32* wnext = sh.first_words(W);
    int ktnext = warp;

    auto issue = [&](int stage) {
        const int grp = group_of(ktnext, sh.group_shift, tiles_per_group);
#pragma unroll
        for (int m = 0; m < MR; m++) {
            const int slot = stage * MR + m;
            const u32* wp = wnext + m * row_tile_words;
            cp_async<RW * 4>(runs_at + slot * 32 * RW * 4, wp);
            if (BITS == 3) cp_async<4>(thirds_at + slot * 32 * 4, wp + 64 - lane);
            const u32* mp = meta_rows + (size_t)grp * N + m * 16;
            cp_async<4>(scales_at + slot * 32 * 8, mp);
            cp_async<4>(scales_at + slot * 32 * 8 + 4, mp + 8);
        }
        wnext += KS * BITS * 32;
        ktnext += KS;
    };

    float acc[MR][1][4];
#pragma unroll
    for (int m = 0; m < MR; m++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[m][0][j] = 0.f;

#pragma unroll
    for (int st = 0; st < S - 1; st++) {
        if (st < count) issue(st);
        cp_async_commit();
    }
    let_next_launch_start();
    wait_for_previous_launch();
    for (int j = 0; j < count; j++) {
        if (j + S - 1 < count) issue((j + S - 1) % S);
        cp_async_commit();
        Tile<BITS, MR, 1> tl;
        load_x(tl.x, io, x_lane + (size_t)(warp + j * KS) * 64);
        cp_async_wait<S - 1>();
        const int stage = j % S;
#pragma unroll
        for (int m = 0; m < MR; m++) {
            const int slot = stage * MR + m;
            const u32* r = runs + slot * 32 * RW;
            if (BITS == 4) {
                const uint4 v = *(const uint4*)r;
                tl.w[m][0] = v.x; tl.w[m][1] = v.y; tl.w[m][2 % BITS] = v.z; tl.w[m][3 % BITS] = v.w;
            } else {
                const uint2 v = *(const uint2*)r;
                tl.w[m][0] = v.x; tl.w[m][1] = v.y;
                if (BITS == 3) tl.w[m][2 % BITS] = thirds[slot * 32];
            }
            const uint2 sc = *(const uint2*)(scales + slot * 32 * 2);
            tl.meta[m][0] = sc.x;
            tl.meta[m][1] = sc.y;
        }
        compute_tile<BITS, POT, MR, 1>(acc, tl, io, K, B, g, sh.t, 0);
    }
    cp_async_wait<0>();

    float* red = (float*)(smem + KS * S * MR * 32 * (BITS + 2));
    reduce_store<MR, 1, KS>(acc, red, io, N, B, rt0);
}

#define QGEMM(NAME, BITS, POT, MR, NT, KS, U)                                                      \
    extern "C" __global__ void __launch_bounds__(32 * KS)                                          \
        NAME##_b##BITS##_m##MR##_n##NT##_k##KS##_u##U(const u32* W, const u32* meta, const void* X, \
                                                      void* Y, int N, int K, int B, int tpg, int io) { \
        qgemm_body<BITS, POT, MR, NT, KS, U>(W, meta, Io{X, Y, io}, N, K, B, tpg);                   \
    }

#define QGEMM_CONFIGS(NAME, BITS, POT)  \
    QGEMM(NAME, BITS, POT, 1, 1, 8, 4)  \
    QGEMM(NAME, BITS, POT, 1, 1, 8, 8)  \
    QGEMM(NAME, BITS, POT, 1, 1, 16, 2) \
    QGEMM(NAME, BITS, POT, 1, 1, 16, 4) \
    QGEMM(NAME, BITS, POT, 1, 1, 32, 2) \
    QGEMM(NAME, BITS, POT, 2, 1, 8, 4)  \
    QGEMM(NAME, BITS, POT, 2, 1, 16, 2) \
    QGEMM(NAME, BITS, POT, 1, 2, 8, 4)  \
    QGEMM(NAME, BITS, POT, 1, 2, 8, 2)  \
    QGEMM(NAME, BITS, POT, 1, 2, 16, 2) \
    QGEMM(NAME, BITS, POT, 2, 2, 8, 2)  \
    QGEMM(NAME, BITS, POT, 1, 4, 8, 2)  \
    QGEMM(NAME, BITS, POT, 1, 8, 8, 2)  \
    QGEMM(NAME, BITS, POT, 2, 4, 4, 2)  \
    QGEMM(NAME, BITS, POT, 2, 8, 4, 2)

// One token (B = 1) with its activations in shared memory (`stage_x`; K f16 of dynamic
// shared memory), U tiles in flight in registers.
#define QGEMV_XS(NAME, BITS, POT, MR, KS, U)                                                       \
    extern "C" __global__ void __launch_bounds__(32 * KS)                                          \
        NAME##_b##BITS##_m##MR##_n1_k##KS##_x##U(const u32* W, const u32* meta, const void* X,     \
                                                 void* Y, int N, int K, int B, int tpg, int io) {  \
        qgemm_body<BITS, POT, MR, 1, KS, U, true>(W, meta, Io{X, Y, io}, N, K, B, tpg);            \
    }

#define QGEMV_XS_CONFIGS(NAME, BITS, POT) \
    QGEMV_XS(NAME, BITS, POT, 1, 16, 2)   \
    QGEMV_XS(NAME, BITS, POT, 1, 16, 4)   \
    QGEMV_XS(NAME, BITS, POT, 2, 16, 2)   \
    QGEMV_XS(NAME, BITS, POT, 2, 16, 4)   \
    QGEMV_XS(NAME, BITS, POT, 2, 8, 4)    \
    QGEMV_XS(NAME, BITS, POT, 2, 8, 8)

#define QGEMV_ASYNC(NAME, BITS, POT, MR, KS, S)                                                    \
    extern "C" __global__ void __launch_bounds__(32 * KS)                                          \
        NAME##_b##BITS##_m##MR##_n1_k##KS##_s##S(const u32* W, const u32* meta, const void* X,     \
                                                 void* Y, int N, int K, int B, int tpg, int io) {  \
        qgemv_async_body<BITS, POT, MR, KS, S>(W, meta, Io{X, Y, io}, N, K, B, tpg);               \
    }

#define QGEMV_ASYNC_CONFIGS(NAME, BITS, POT) \
    QGEMV_ASYNC(NAME, BITS, POT, 1, 8, 8)    \
    QGEMV_ASYNC(NAME, BITS, POT, 1, 8, 16)   \
    QGEMV_ASYNC(NAME, BITS, POT, 1, 16, 4)   \
    QGEMV_ASYNC(NAME, BITS, POT, 1, 16, 8)   \
    QGEMV_ASYNC(NAME, BITS, POT, 2, 8, 8)    \
    QGEMV_ASYNC(NAME, BITS, POT, 2, 16, 4)

// The weights as f16 [N][K] (row-major), for products of many tokens through cuBLAS: a warp
// decodes a tile as the products do, multiplies by the scale in f32, and writes the tile's
// rows through shared memory as whole 16-byte runs.
__device__ __forceinline__ float f16hi_to_f32(u32 v) { return f16lo_to_f32(v >> 16); }

// Words per row of a staged tile: 32 of weights and 4 of padding (fewer bank conflicts, rows
// still 16-byte aligned).
constexpr int STAGE_ROW = 36;

template <int BITS, bool POT>
__device__ __forceinline__ void dequant_body(const u32* __restrict__ W, const u32* __restrict__ meta, u16* __restrict__ out,
                                             int N, int K, int tiles_per_group) {
    constexpr int RW = BITS == 4 ? 4 : 2;
    __shared__ __align__(16) u32 stage[8][16 * STAGE_ROW];
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    u32* tile_rows = stage[threadIdx.x >> 5];
    const int ktiles = K >> 6, tiles = (N >> 4) * ktiles;
    const int warps = gridDim.x * (blockDim.x >> 5);
    for (int tile = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); tile < tiles; tile += warps) {
        const int rt = tile / ktiles, kt = tile % ktiles, grp = kt / tiles_per_group;
        u32 w[BITS];
        load_words<BITS>(w, W + (size_t)tile * BITS * 32 + RW * lane);
        const u32* mp = meta + (size_t)grp * N + rt * 16 + g;
        const RowScales<POT> rs(ld_nc(mp), ld_nc(mp + 8));
        const u32 w2r = BITS == 3 ? rotl(w[2 % BITS], 1) : 0u;
        __syncwarp();
#pragma unroll
        for (int p = 0; p < 16; p++) {
            const int reg = p & 3, step = p >> 2;
            const u32 a = decode_pair<BITS, POT>(w, w2r, p, rs);
            const float s = rs.s[reg & 1];
            const int row = g + 8 * (reg & 1), col_word = 8 * t + 2 * step + (reg >> 1);
            tile_rows[row * STAGE_ROW + col_word] = pack_f16x2(f16lo_to_f32(a) * s, f16hi_to_f32(a) * s);
        }
        __syncwarp();
        // 16 rows of 128 bytes: four 16-byte runs a lane, eight lanes a row.
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int c = lane + 32 * i, row = c >> 3, part = c & 7;
            const uint4 v = *(const uint4*)(tile_rows + row * STAGE_ROW + 4 * part);
            *(uint4*)(out + (size_t)(rt * 16 + row) * K + kt * 64 + 8 * part) = v;
        }
    }
}

#define DEQUANT(NAME, BITS, POT)                                                                                \
    extern "C" __global__ void __launch_bounds__(256) NAME##_dequant_b##BITS(const u32* W, const u32* meta, u16* out, \
                                                                             int N, int K, int tpg) {           \
        dequant_body<BITS, POT>(W, meta, out, N, K, tpg);                                                       \
    }

// Device read bandwidth reference, read the way the products read their codes: XORs n
// 16-byte elements and writes a block's result only when every bit of it is set, which the
// benchmarks' data never gives (the write keeps the reads from being optimized away).
extern "C" __global__ void read_u4(const uint4* __restrict__ src, uint4* __restrict__ sink, size_t n) {
    uint4 acc = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll 4
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = ld_stream4((const u32*)(src + i));
        acc.x ^= v.x; acc.y ^= v.y; acc.z ^= v.z; acc.w ^= v.w;
    }
    if ((acc.x & acc.y & acc.z & acc.w) == 0xFFFFFFFFu) sink[blockIdx.x] = acc;
}

// Device copy bandwidth reference: dst[i] = src[i], 16 bytes per thread per step.
extern "C" __global__ void copy_u4(const uint4* __restrict__ src, uint4* __restrict__ dst, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = src[i];
}

// Every kernel of one code format and width. The host compiles one format and width at a time
// (`-D ONLY_POT=0|1 -D ONLY_BITS=2|3|4`; ONLY_BITS=0 for the bandwidth references alone), so
// that the driver turns into machine code only the kernels a model uses; without ONLY_BITS,
// all of them.
#define FORMAT(NAME, BITS, POT) \
    QGEMV_XS_CONFIGS(NAME, BITS, POT) QGEMV_ASYNC_CONFIGS(NAME, BITS, POT) QGEMM_CONFIGS(NAME, BITS, POT) DEQUANT(NAME, BITS, POT)
#if !defined(ONLY_BITS) || (ONLY_POT == 1 && ONLY_BITS == 2)
FORMAT(pot, 2, true)
#endif
#if !defined(ONLY_BITS) || (ONLY_POT == 1 && ONLY_BITS == 3)
FORMAT(pot, 3, true)
#endif
#if !defined(ONLY_BITS) || (ONLY_POT == 1 && ONLY_BITS == 4)
FORMAT(pot, 4, true)
#endif
#if !defined(ONLY_BITS) || (ONLY_POT == 0 && ONLY_BITS == 2)
FORMAT(int, 2, false)
#endif
#if !defined(ONLY_BITS) || (ONLY_POT == 0 && ONLY_BITS == 3)
FORMAT(int, 3, false)
#endif
#if !defined(ONLY_BITS) || (ONLY_POT == 0 && ONLY_BITS == 4)
FORMAT(int, 4, false)
#endif
