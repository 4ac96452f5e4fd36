// Fiber context switching for the emulator's scheduler (kernels/emu/runtime.cpp).
//
// A block's CUDA threads are fibers that switch at every __syncthreads and every warp collective: a shuffle
// reduction over a block of 256 threads is thousands of switches. glibc's swapcontext saves and restores
// the signal mask with a system call (rt_sigprocmask) on every switch, which made the switches, not the
// kernels, about 80% of the emulator's time. On x86-64 the switch here saves only what the System V ABI
// says a call preserves — rbx, rbp, r12–r15, the stack pointer, MXCSR and the x87 control word — on the
// fiber's own stack, and swaps stack pointers: no system call. Elsewhere it falls back to ucontext.
//
// Assumes: one OS thread runs a fiber from start to finish (the scheduler's worker); a fiber's entry
// function never returns (it switches back to the scheduler when its work is done); one translation unit
// includes this header (it defines the switch's symbol).
#pragma once
#include <cstddef>
#include <cstdint>

#if defined(__x86_64__)

extern "C" void emu_context_switch(void** save_sp, void* load_sp);

// Saves the callee-saved state on the current stack, stores the stack pointer in *save_sp, loads
// load_sp and restores the state saved there (by a previous switch, or laid out by context_init).
asm(R"(
    .text
    .p2align 4
    .globl emu_context_switch
    .hidden emu_context_switch
    .type emu_context_switch, @function
emu_context_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_context_switch, .-emu_context_switch
)");

namespace emu {

struct Context {
    void* sp = nullptr;
};

// Lays out [stack, stack + bytes) so that the first switch to `ctx` starts entry() on it, with the
// calling thread's MXCSR and x87 control word.
inline void context_init(Context& ctx, char* stack, size_t bytes, void (*entry)()) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
    auto* slot = reinterpret_cast<uint64_t*>(top);
    // Read from the top down: a return address for entry() that is never used, entry() itself (the
    // switch's `ret` lands there with the stack 8 bytes off 16, as after a call), then rbp, rbx and
    // r12–r15 (zero), then MXCSR and the x87 control word. The switch pops them in the reverse order.
    slot[-1] = 0;
    slot[-2] = reinterpret_cast<uint64_t>(entry);
    for (int i = 3; i <= 8; ++i) slot[-i] = 0;
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    slot[-9] = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
    ctx.sp = &slot[-9];
}

// Saves the running context in `from` and resumes `to`.
inline void context_switch(Context& from, const Context& to) { emu_context_switch(&from.sp, to.sp); }

}  // namespace emu

#else

#include <ucontext.h>

namespace emu {

struct Context {
    ucontext_t uc;
};

inline void context_init(Context& ctx, char* stack, size_t bytes, void (*entry)()) {
    getcontext(&ctx.uc);
    ctx.uc.uc_stack.ss_sp = stack;
    ctx.uc.uc_stack.ss_size = bytes;
    ctx.uc.uc_link = nullptr;
    makecontext(&ctx.uc, entry, 0);
}

inline void context_switch(Context& from, const Context& to) { swapcontext(&from.uc, &to.uc); }

}  // namespace emu

#endif
