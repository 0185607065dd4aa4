// What qgemm.cu and decode.cu both need. NVRTC compiles each of them alone, without
// headers, with this text in front (`SOURCE` in mod.rs and decode.rs).

typedef unsigned short u16;  // an f16's bits
typedef unsigned int u32;

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Programmatic dependent launch (sm_90, when the host launches with it; no-ops otherwise): a
// kernel lets the next launch start once it has begun, and waits for the previous launch to
// end before it reads what that one writes.
__device__ __forceinline__ void let_next_launch_start() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_previous_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
