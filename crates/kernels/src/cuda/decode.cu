// The parts of a transformer block around its linear layers, for decoding one token at a
// time: embedding lookup, RMS norm with the residual add, rotary embedding with the KV-cache
// write, attention over the cache, and the SwiGLU gate. The token and its position are read
// from device memory, so a decode step is the same launches with the same arguments every
// token and can be replayed as a CUDA graph. Compiled at run time by NVRTC; no headers.
//
// Activations between kernels are f16 (what the fused products read and write); the residual
// stream is f32; sums are f32. `u16` holds an f16. The types, the f32 → f16 conversion and
// the dependent-launch pair come from common.cuh, in front of this file.

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Launched dependently (sm_90+): the previous kernel may still run until this wait returns,
// and the next may start launching right after it (it waits for this one to end in turn).
__device__ __forceinline__ void wait_for_previous() {
    wait_for_previous_launch();
    let_next_launch_start();
}

// The sum (or max) of `v` over the block, returned to every thread. `scratch`: 32 floats.
__device__ float block_reduce(float v, float* scratch, bool is_max) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < warps ? scratch[lane] : (is_max ? NEG_INF : 0.0f);
    return is_max ? warp_max(r) : warp_sum(r);
}

// x[d] = table[token][d], the token read from `token`; the table in f16 or f32.
extern "C" __global__ void embed(const void* table, int table_f32, const int* token, float* x, int d) {
    wait_for_previous();
    const long row = (long)(*token) * d;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < d; i += gridDim.x * blockDim.x)
        x[i] = table_f32 ? ((const float*)table)[row + i] : h2f(((const u16*)table)[row + i]);
}

// x += delta (when given, f16); out = x / rms(x) · w as f16. One block.
extern "C" __global__ void residual_rms_norm(float* x, const u16* delta, const float* w, u16* out, int d, float eps) {
    wait_for_previous();
    __shared__ float scratch[32];
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = x[i];
        if (delta) {
            v += h2f(delta[i]);
            x[i] = v;
        }
        ss += v * v;
    }
    const float inv = rsqrtf(block_reduce(ss, scratch, false) / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[i] = f32_to_f16(x[i] * inv * w[i]);
}

// Rotates the half-split pair (i, i + half) of a head by the angle of `pos`.
__device__ __forceinline__ void rotate(float& a, float& b, const float* cos_t, const float* sin_t, int pos, int half, int i) {
    const float c = cos_t[pos * half + i], s = sin_t[pos * half + i];
    const float a0 = a;
    a = a0 * c - b * s;
    b = b * c + a0 * s;
}

// Block h < heads: query head h of `q` (biased, rotated) in place. Block heads + h: KV head h
// (biased; the key rotated) written to row `pos` of the caches `[kv_heads][capacity][head_dim]`.
// Threads: head_dim / 2, one rotated pair each.
extern "C" __global__ void rope_append(
    u16* q, const u16* k, const u16* v, const float* q_bias, const float* k_bias, const float* v_bias,
    const float* cos_t, const float* sin_t, const int* position, u16* k_cache, u16* v_cache,
    int heads, int head_dim, int capacity) {
    wait_for_previous();
    const int half = head_dim / 2, i = threadIdx.x, pos = *position;
    if (i >= half) return;
    int h = blockIdx.x;
    if (h < heads) {
        u16* row = q + h * head_dim;
        float a = h2f(row[i]), b = h2f(row[i + half]);
        if (q_bias) a += q_bias[h * head_dim + i], b += q_bias[h * head_dim + i + half];
        rotate(a, b, cos_t, sin_t, pos, half, i);
        row[i] = f32_to_f16(a);
        row[i + half] = f32_to_f16(b);
        return;
    }
    h -= heads;
    const int at = h * head_dim;
    const long to = ((long)h * capacity + pos) * head_dim;
    float a = h2f(k[at + i]), b = h2f(k[at + i + half]);
    if (k_bias) a += k_bias[at + i], b += k_bias[at + i + half];
    rotate(a, b, cos_t, sin_t, pos, half, i);
    k_cache[to + i] = f32_to_f16(a);
    k_cache[to + i + half] = f32_to_f16(b);
    float c = h2f(v[at + i]), e = h2f(v[at + i + half]);
    if (v_bias) c += v_bias[at + i], e += v_bias[at + i + half];
    v_cache[to + i] = f32_to_f16(c);
    v_cache[to + i + half] = f32_to_f16(e);
}

// Up to this many f32 per lane hold a head's output dimensions (head_dim ≤ 32·MAX_DIMS).
#define MAX_DIMS 8

// The dot product of f32 `q` (shared) with the f16 row `k` of `n` elements, 8 at a time when
// `n` is a multiple of 8 (16-byte loads; rows then start 16-byte aligned).
__device__ __forceinline__ float dot_row(const float* q, const u16* k, int n) {
    float s = 0.0f;
    if ((n & 7) == 0) {
        for (int i = 0; i < n; i += 8) {
            const uint4 w = *(const uint4*)(k + i);
            const u32 parts[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int p = 0; p < 4; ++p)
                s += q[i + 2 * p] * h2f((u16)(parts[p] & 0xffffu)) + q[i + 2 * p + 1] * h2f((u16)(parts[p] >> 16));
        }
    } else {
        for (int i = 0; i < n; ++i) s += q[i] * h2f(k[i]);
    }
    return s;
}

// One query head per block row (blockIdx.x) over keys 0..=pos of its KV head, the keys split
// in gridDim.y equal runs, a block each (long caches then spread over the GPU, not 32 SMs).
// Scores: a thread per key, the whole dot product in its registers, into shared memory; the
// softmax there; the weighted sum of values: each warp takes every warps-th key, its lanes the
// head's dimensions (coalesced rows), and the warps' partial sums are added at the end. One
// run writes the output; several write their max, sum and unnormalized output to `partials`
// (f32 [heads, runs, 2 + head_dim]) and the last of a head's blocks to finish (`done`, a
// count per head, left at 0) combines them. Dynamic shared memory: head_dim + ⌈capacity /
// runs⌉ + warps·head_dim floats.
extern "C" __global__ void attention(
    const u16* q, const u16* k_cache, const u16* v_cache, const int* position, u16* out,
    float* partials, unsigned* done, int heads, int kv_heads, int head_dim, int capacity, float scale) {
    wait_for_previous();
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    __shared__ bool last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int runs = gridDim.y, run = blockIdx.y, per_run = (capacity + runs - 1) / runs;
    float* qs = smem;
    float* scores = qs + head_dim;
    float* partial = scores + per_run;
    const int h = blockIdx.x, kvh = h / (heads / kv_heads), keys = *position + 1;
    const int span = (keys + runs - 1) / runs, j0 = run * span, n = max(0, min(keys, j0 + span) - j0);
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) qs[i] = h2f(q[h * head_dim + i]) * scale;
    __syncthreads();
    const u16* kh = k_cache + ((long)kvh * capacity + j0) * head_dim;
    const u16* vh = v_cache + ((long)kvh * capacity + j0) * head_dim;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float s = dot_row(qs, kh + (long)j * head_dim, head_dim);
        scores[j] = s;
        m = fmaxf(m, s);
    }
    m = block_reduce(m, scratch, true);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float p = __expf(scores[j] - m);
        scores[j] = p;
        sum += p;
    }
    sum = block_reduce(sum, scratch, false);
    float acc[MAX_DIMS];
#pragma unroll
    for (int t = 0; t < MAX_DIMS; ++t) acc[t] = 0.0f;
#pragma unroll 4
    for (int j = warp; j < n; j += warps) {
        const float p = scores[j];
        const u16* vj = vh + (long)j * head_dim;
#pragma unroll
        for (int t = 0; t < MAX_DIMS; ++t) {
            const int d = lane + 32 * t;
            if (d < head_dim) acc[t] += p * h2f(vj[d]);
        }
    }
#pragma unroll
    for (int t = 0; t < MAX_DIMS; ++t) {
        const int d = lane + 32 * t;
        if (d < head_dim) partial[warp * head_dim + d] = acc[t];
    }
    __syncthreads();
    if (runs == 1) {
        const float inv = 1.0f / sum;
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float o = 0.0f;
            for (int w = 0; w < warps; ++w) o += partial[w * head_dim + d];
            out[h * head_dim + d] = f32_to_f16(o * inv);
        }
        return;
    }
    float* mine = partials + ((long)h * runs + run) * (2 + head_dim);
    if (threadIdx.x == 0) {
        mine[0] = m;
        mine[1] = sum;
    }
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < warps; ++w) o += partial[w * head_dim + d];
        mine[2 + d] = o;
    }
    // The classic last-block reduction: every thread's writes visible device-wide before its
    // block counts itself done.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&done[h], 1u) == (unsigned)runs - 1;
    __syncthreads();
    if (!last) return;
    const float* all = partials + (long)h * runs * (2 + head_dim);
    float top = NEG_INF;
    for (int r = 0; r < runs; ++r) top = fmaxf(top, __ldcg(all + r * (2 + head_dim)));
    float total = 0.0f;
    for (int r = 0; r < runs; ++r) {
        const float mr = __ldcg(all + r * (2 + head_dim));
        if (mr != NEG_INF) total += __ldcg(all + r * (2 + head_dim) + 1) * __expf(mr - top);
    }
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int r = 0; r < runs; ++r) {
            const float mr = __ldcg(all + r * (2 + head_dim));
            if (mr != NEG_INF) o += __ldcg(all + r * (2 + head_dim) + 2 + d) * __expf(mr - top);
        }
        out[h * head_dim + d] = f32_to_f16(o / total);
    }
    if (threadIdx.x == 0) done[h] = 0;
}

// out = silu(gate) · up, f16.
extern "C" __global__ void silu_mul(const u16* gate, const u16* up, u16* out, int n) {
    wait_for_previous();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float g = h2f(gate[i]);
        out[i] = f32_to_f16(g / (1.0f + __expf(-g)) * h2f(up[i]));
    }
}
