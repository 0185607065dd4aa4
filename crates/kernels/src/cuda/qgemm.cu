// Fused dequant-GEMV/GEMM over PoT and INT codes in the tile layout of layout.rs, for
// sm_80+ (mma.sync m16n8k16, f16 inputs, f32 accumulation). Compiled at run time by NVRTC;
// no headers: half-precision arithmetic is written in PTX.
//
// Y[tok][row] = sum_k W[row][k] * X[tok][k]; X is f16 [B][K], Y f16 [B][N].
// A block owns MR row tiles (16·MR rows); its KS warps split the K tiles between them
// (warp w takes tiles w, w+KS, ...), loading U tiles ahead, and add their partial sums in
// shared memory at the end. Each lane decodes its pairs of weights straight into the A
// fragments of the mma: PoT as bits(s)·0x10001 + fields (one 32-bit add for two f16
// weights), INT as ((fields | 0x6400·0x10001) − (1024 + z)) · s.

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 rotl(u32 x, int r) {
    return r == 0 ? x : __funnelshift_l(x, x, r);
}

__device__ __forceinline__ u32 ld_stream(const u32* p) {
    u32 v;
    asm volatile("ld.global.nc.L1::no_allocate.b32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ u32 ld_nc(const u32* p) {
    u32 v;
    asm volatile("ld.global.nc.b32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
    u32 d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The fields of pair p (see layout.rs: planes, rotations, masks).
template <int BITS, bool POT>
__device__ __forceinline__ u32 fields(const u32 (&w)[BITS], int p) {
    const u32 MA = POT ? (BITS == 2 ? 0x84008400u : 0x0C000C00u) : 0x00030003u;
    u32 f = rotl(w[p >> 3], 2 * (p & 7)) & MA;
    if (BITS == 3) {
        const u32 MB = POT ? 0x80008000u : 0x00040004u;
        f |= rotl(w[2], p) & MB;
    }
    if (BITS == 4) {
        const u32 MB = POT ? 0x90009000u : 0x000C000Cu;
        f |= rotl(w[2 + (p >> 3)], 2 * (p & 7)) & MB;
    }
    return f;
}

// The codes and group parameters of the U tiles of one step of a warp (tiles kt0 + u·KS).
template <int BITS, int MR, int U>
struct Stage {
    u32 w[U][MR][BITS];
    u32 meta[U][MR][2];
};

template <int BITS, int MR, int KS, int U>
__device__ __forceinline__ void load_stage(Stage<BITS, MR, U>& st, const u32* __restrict__ W, const u32* __restrict__ meta,
                                           int rt0, int kt0, int ktiles, int N, int tiles_per_group, int lane, int g) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int kt = kt0 + u * KS;
        if (kt < ktiles) {
            const int grp = kt / tiles_per_group;
#pragma unroll
            for (int m = 0; m < MR; m++) {
#pragma unroll
                for (int i = 0; i < BITS; i++)
                    st.w[u][m][i] = ld_stream(W + ((size_t)((rt0 + m) * ktiles + kt) * BITS + i) * 32 + lane);
                const u32* mp = meta + (size_t)grp * N + (rt0 + m) * 16 + g;
                st.meta[u][m][0] = ld_nc(mp);
                st.meta[u][m][1] = ld_nc(mp + 8);
            }
        }
    }
}

template <int BITS, bool POT, int MR, int NT, int KS, int U>
__device__ __forceinline__ void compute_stage(float (&acc)[MR][NT][4], const Stage<BITS, MR, U>& st, const u16* __restrict__ X,
                                              int kt0, int ktiles, int K, int B, int g, int t) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int kt = kt0 + u * KS;
        if (kt < ktiles) {
            u32 s_lo[MR], s_hi[MR], z_lo[MR], z_hi[MR];
#pragma unroll
            for (int m = 0; m < MR; m++) {
                const u32 a = st.meta[u][m][0], b = st.meta[u][m][1];
                s_lo[m] = (a & 0xFFFFu) * 0x10001u;
                s_hi[m] = (b & 0xFFFFu) * 0x10001u;
                z_lo[m] = (a >> 16) * 0x10001u;
                z_hi[m] = (b >> 16) * 0x10001u;
            }
#pragma unroll
            for (int step = 0; step < 4; step++) {
                u32 bf[NT][2];
                const int k = kt * 64 + step * 16 + 2 * t;
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    const int n = nt * 8 + g;
                    if (n < B) {
                        const u32* xp = (const u32*)(X + (size_t)n * K + k);
                        bf[nt][0] = __ldg(xp);
                        bf[nt][1] = __ldg(xp + 4);
                    } else {
                        bf[nt][0] = 0u;
                        bf[nt][1] = 0u;
                    }
                }
#pragma unroll
                for (int m = 0; m < MR; m++) {
                    u32 a[4];
#pragma unroll
                    for (int reg = 0; reg < 4; reg++) {
                        const u32 f = fields<BITS, POT>(st.w[u][m], step * 4 + reg);
                        const u32 s2 = (reg & 1) ? s_hi[m] : s_lo[m];
                        if (POT) {
                            a[reg] = s2 + f;
                        } else {
                            const u32 z2 = (reg & 1) ? z_hi[m] : z_lo[m];
                            a[reg] = hmul2(hsub2(f | 0x64006400u, z2), s2);
                        }
                    }
#pragma unroll
                    for (int nt = 0; nt < NT; nt++) mma16816(acc[m][nt], a, bf[nt][0], bf[nt][1]);
                }
            }
        }
    }
}

template <int BITS, bool POT, int MR, int NT, int KS, int U>
__device__ __forceinline__ void qgemm_body(const u32* __restrict__ W, const u32* __restrict__ meta,
                                           const u16* __restrict__ X, u16* __restrict__ Y,
                                           int N, int K, int B, int tiles_per_group) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int ktiles = K >> 6;
    const int rt0 = blockIdx.x * MR;
    float acc[MR][NT][4];
#pragma unroll
    for (int m = 0; m < MR; m++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[m][nt][j] = 0.f;

    // A step loads U tiles and their scales together, then decodes them; more warps per SM
    // (not deeper per-warp buffering, measured slower) hide the latency.
    Stage<BITS, MR, U> st;
    for (int kt0 = warp; kt0 < ktiles; kt0 += KS * U) {
        load_stage<BITS, MR, KS, U>(st, W, meta, rt0, kt0, ktiles, N, tiles_per_group, lane, g);
        compute_stage<BITS, POT, MR, NT, KS, U>(acc, st, X, kt0, ktiles, K, B, g, t);
    }

    constexpr int E = MR * NT * 4 * 32;
    __shared__ float red[KS * E];
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
        if (tok < B) Y[(size_t)tok * N + row] = f32_to_f16(s);
    }
}

#define QGEMM(NAME, BITS, POT, MR, NT, KS, U)                                                      \
    extern "C" __global__ void __launch_bounds__(32 * KS)                                          \
        NAME##_b##BITS##_m##MR##_n##NT##_k##KS##_u##U(const u32* W, const u32* meta, const u16* X, \
                                                      u16* Y, int N, int K, int B, int tpg) {      \
        qgemm_body<BITS, POT, MR, NT, KS, U>(W, meta, X, Y, N, K, B, tpg);                         \
    }

#define QGEMM_CONFIGS(NAME, BITS, POT)  \
    QGEMM(NAME, BITS, POT, 1, 1, 8, 4)  \
    QGEMM(NAME, BITS, POT, 1, 1, 16, 2) \
    QGEMM(NAME, BITS, POT, 1, 1, 16, 4) \
    QGEMM(NAME, BITS, POT, 1, 1, 32, 2) \
    QGEMM(NAME, BITS, POT, 1, 2, 8, 4)  \
    QGEMM(NAME, BITS, POT, 1, 4, 8, 2)  \
    QGEMM(NAME, BITS, POT, 1, 8, 8, 2)  \
    QGEMM(NAME, BITS, POT, 2, 4, 4, 2)  \
    QGEMM(NAME, BITS, POT, 2, 8, 4, 2)

QGEMM_CONFIGS(pot, 2, true)
QGEMM_CONFIGS(pot, 3, true)
QGEMM_CONFIGS(pot, 4, true)
QGEMM_CONFIGS(int, 2, false)
QGEMM_CONFIGS(int, 3, false)
QGEMM_CONFIGS(int, 4, false)

// Device copy bandwidth reference: dst[i] = src[i], 16 bytes per thread per step.
extern "C" __global__ void copy_u4(const uint4* __restrict__ src, uint4* __restrict__ dst, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
