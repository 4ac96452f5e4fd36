// The emulator's scheduler: runs a registered kernel over a grid on the CPU.
//
// Blocks are spread over worker threads (one block at a time per worker, so `static thread_local` shared
// memory is per block). A block's threads are fibers (kernels/emu/context.h) run round-robin in
// thread-index order (ascending, or descending to expose races); a fiber yields at __syncthreads and at
// warp collectives, and the scheduler releases a barrier when every live thread of the block (or of the
// warp) has reached it. A barrier that can never be released (divergent __syncthreads) is reported as an
// error naming a waiting thread instead of hanging.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "context.h"
#include "emu.h"

namespace emu {
namespace {

struct KernelEntry {
    void* kernel;
    Trampoline trampoline;
};

std::map<std::string, KernelEntry>& registry() {
    static std::map<std::string, KernelEntry> r;
    return r;
}

enum class State { Ready, BlockBarrier, WarpBarrier, Done };

struct Fiber {
    Context ctx;
    State state = State::Ready;
    uint3 tid{};
    int lane = 0;
    int warp = 0;
    unsigned gen = 0;  // warp collectives passed
    int barrier_line = 0;
};

constexpr size_t kStackBytes = 64 * 1024;

// A fiber's stack: kStackBytes (peak use measured in single kilobytes) above an inaccessible guard page, so
// that an overflow faults where it happens instead of silently overwriting the neighbouring fiber's stack.
class Stack {
   public:
    Stack() = default;
    // A mapped stack, or an empty one if the system refuses the memory.
    static Stack map() {
        Stack s;
        s.guard_ = size_t(sysconf(_SC_PAGESIZE));
        void* p = mmap(nullptr, s.guard_ + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return Stack();
        s.mem_ = static_cast<char*>(p);
        if (mprotect(s.mem_, s.guard_, PROT_NONE) != 0) return Stack();
        return s;
    }
    Stack(Stack&& o) noexcept : mem_(o.mem_), guard_(o.guard_) { o.mem_ = nullptr; }
    Stack& operator=(Stack&& o) noexcept {
        std::swap(mem_, o.mem_);
        std::swap(guard_, o.guard_);
        return *this;
    }
    Stack(const Stack&) = delete;
    Stack& operator=(const Stack&) = delete;
    ~Stack() {
        if (mem_) munmap(mem_, guard_ + kStackBytes);
    }
    explicit operator bool() const { return mem_ != nullptr; }
    // The usable bytes, above the guard page.
    char* bottom() const { return mem_ + guard_; }

   private:
    char* mem_ = nullptr;
    size_t guard_ = 0;
};

// Fiber stacks, kept for later launches: each launch runs on new worker threads, and mapping stacks afresh
// costs system calls and a page fault per 4 KiB touched, every launch. Holds at most the most fibers that
// were ever alive at once (workers × threads per block).
class StackPool {
   public:
    Stack take() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (!free_.empty()) {
                Stack s = std::move(free_.back());
                free_.pop_back();
                return s;
            }
        }
        return Stack::map();
    }
    void give_back(std::vector<Stack>& stacks) {
        std::lock_guard<std::mutex> lock(mutex_);
        for (Stack& s : stacks)
            if (s) free_.push_back(std::move(s));
        stacks.clear();
    }

   private:
    std::mutex mutex_;
    std::vector<Stack> free_;
};

StackPool& stack_pool() {
    static StackPool pool;
    return pool;
}

struct Worker {
    Context scheduler;
    std::vector<Fiber> fibers;
    std::vector<Stack> stacks;
    std::vector<uint64_t> slots;  // [warp][2][32]
    std::vector<unsigned char> dynamic_shared;
    int current = 0;
    bool reverse = false;  // resume fibers in descending thread index
    KernelEntry entry{};
    void** args = nullptr;
};

thread_local Worker* worker = nullptr;

// A fiber's whole life: the kernel for its thread, then back to the scheduler, which never resumes it.
void fiber_main() {
    Worker* w = worker;
    w->entry.trampoline(w->entry.kernel, w->args);
    Fiber& f = w->fibers[w->current];
    f.state = State::Done;
    context_switch(f.ctx, w->scheduler);
    __builtin_unreachable();
}

void yield(State s) {
    Worker* w = worker;
    Fiber& f = w->fibers[w->current];
    f.state = s;
    context_switch(f.ctx, w->scheduler);
}

const char* state_name(State s) {
    switch (s) {
        case State::BlockBarrier:
            return "__syncthreads";
        case State::WarpBarrier:
            return "a warp collective";
        default:
            return "nothing";
    }
}

// Runs one block to completion; returns an empty string or an error.
std::string run_block(Worker& w, uint3 block, dim3 grid, dim3 bdim) {
    int n = int(bdim.x * bdim.y * bdim.z);
    int warps = (n + 31) / 32;
    w.fibers.assign(n, Fiber{});
    while (w.stacks.size() < size_t(n)) {
        w.stacks.push_back(stack_pool().take());
        if (!w.stacks.back()) return "the system refused the memory for a fiber stack";
    }
    w.slots.assign(size_t(warps) * 64, 0);
    for (int i = 0; i < n; ++i) {
        Fiber& f = w.fibers[i];
        f.tid = uint3{unsigned(i % bdim.x), unsigned((i / bdim.x) % bdim.y), unsigned(i / (bdim.x * bdim.y))};
        f.lane = i % 32;
        f.warp = i / 32;
        context_init(f.ctx, w.stacks[i].bottom(), kStackBytes, fiber_main);
    }
    for (;;) {
        for (int k = 0; k < n; ++k) {
            int i = w.reverse ? n - 1 - k : k;
            if (w.fibers[i].state != State::Ready) continue;
            w.current = i;
            tls.thread_idx = w.fibers[i].tid;
            tls.block_idx = block;
            tls.block_dim = bdim;
            tls.grid_dim = grid;
            tls.dynamic_shared = w.dynamic_shared.data();
            context_switch(w.scheduler, w.fibers[i].ctx);
        }
        bool all_done = true, released = false;
        for (int wp = 0; wp < warps; ++wp) {
            bool any = false, all_at = true;
            for (int i = wp * 32; i < std::min(n, wp * 32 + 32); ++i) {
                State s = w.fibers[i].state;
                if (s == State::Done) continue;
                all_done = false;
                any = true;
                all_at &= s == State::WarpBarrier;
            }
            if (any && all_at) {
                for (int i = wp * 32; i < std::min(n, wp * 32 + 32); ++i)
                    if (w.fibers[i].state == State::WarpBarrier) w.fibers[i].state = State::Ready;
                released = true;
            }
        }
        if (all_done) return "";
        if (released) continue;
        bool all_block = true;
        int line = -1;
        for (auto& f : w.fibers) {
            if (f.state == State::Done) continue;
            all_block &= f.state == State::BlockBarrier;
            if (f.state == State::BlockBarrier) {
                if (line >= 0 && f.barrier_line != line) {
                    char buf[256];
                    std::snprintf(buf, sizeof buf,
                                  "divergent __syncthreads in block (%u,%u,%u): threads wait at line %d and at line %d",
                                  block.x, block.y, block.z, line, f.barrier_line);
                    return buf;
                }
                line = f.barrier_line;
            }
        }
        if (all_block) {
            for (auto& f : w.fibers)
                if (f.state == State::BlockBarrier) f.state = State::Ready;
            continue;
        }
        for (auto& f : w.fibers) {
            if (f.state != State::Done) {
                char buf[256];
                std::snprintf(buf, sizeof buf,
                              "deadlock in block (%u,%u,%u): thread (%u,%u,%u) waits at %s while other threads wait "
                              "elsewhere or have exited",
                              block.x, block.y, block.z, f.tid.x, f.tid.y, f.tid.z, state_name(f.state));
                return buf;
            }
        }
        return "scheduler error";
    }
}

}  // namespace

void register_kernel(const char* name, void* kernel, Trampoline trampoline) {
    registry()[name] = KernelEntry{kernel, trampoline};
}

void syncthreads(int line) {
    worker->fibers[worker->current].barrier_line = line;
    yield(State::BlockBarrier);
}

void syncwarp() {
    Fiber& f = worker->fibers[worker->current];
    f.gen++;
    yield(State::WarpBarrier);
}

int lane_id() { return worker->fibers[worker->current].lane; }

uint64_t warp_exchange(uint64_t bits, int src_lane) {
    Worker* w = worker;
    Fiber& f = w->fibers[w->current];
    unsigned buf = f.gen++ & 1u;
    size_t base = size_t(f.warp) * 64 + buf * 32;
    w->slots[base + f.lane] = bits;
    yield(State::WarpBarrier);
    return w->slots[base + (src_lane & 31)];
}

unsigned warp_ballot(bool pred) {
    Worker* w = worker;
    Fiber& f = w->fibers[w->current];
    unsigned buf = f.gen++ & 1u;
    size_t base = size_t(f.warp) * 64 + buf * 32;
    w->slots[base + f.lane] = pred ? 1u : 0u;
    yield(State::WarpBarrier);
    unsigned mask = 0;
    int lanes = std::min<int>(32, int(w->fibers.size()) - f.warp * 32);
    for (int l = 0; l < lanes; ++l)
        if (w->fibers[size_t(f.warp) * 32 + l].state != State::Done && w->slots[base + l]) mask |= 1u << l;
    return mask;
}

}  // namespace emu

extern "C" {

// Launches `name` over `grid` × `block` with `shared_bytes` of dynamic shared memory; `args` as for
// cuLaunchKernel; each block's threads resumed in descending index order when `reverse_fibers` is non-zero.
// Returns 0, or 1 with a message in `err`.
int emu_launch(const char* name, const unsigned* grid, const unsigned* block, unsigned shared_bytes, void** args,
               unsigned workers, int reverse_fibers, char* err, size_t err_len) {
    auto fail = [&](const std::string& msg) {
        std::snprintf(err, err_len, "%s", msg.c_str());
        return 1;
    };
    auto it = emu::registry().find(name);
    if (it == emu::registry().end()) return fail(std::string("kernel '") + name + "' is not registered in the emulator");
    dim3 g(grid[0], grid[1], grid[2]), b(block[0], block[1], block[2]);
    unsigned long long blocks = 1ull * g.x * g.y * g.z;
    if (b.x * b.y * b.z == 0 || b.x * b.y * b.z > 1024) return fail("block size must be 1..1024 threads");
    if (blocks == 0) return 0;
    unsigned n_workers = std::max(1u, std::min<unsigned>(workers, unsigned(std::min<unsigned long long>(blocks, 1024))));
    std::mutex m;
    std::string first_error;
    auto work = [&](unsigned wi) {
        emu::Worker w;
        w.entry = it->second;
        w.args = args;
        w.reverse = reverse_fibers != 0;
        w.dynamic_shared.assign(std::max(shared_bytes, 16u), 0);
        emu::worker = &w;
        for (unsigned long long bi = wi; bi < blocks; bi += n_workers) {
            uint3 bid{unsigned(bi % g.x), unsigned((bi / g.x) % g.y), unsigned(bi / (1ull * g.x * g.y))};
            std::string e = emu::run_block(w, bid, g, b);
            if (!e.empty()) {
                std::lock_guard<std::mutex> lock(m);
                if (first_error.empty()) first_error = std::string(name) + ": " + e;
                break;
            }
        }
        emu::worker = nullptr;
        emu::stack_pool().give_back(w.stacks);
    };
    std::vector<std::thread> threads;
    for (unsigned wi = 1; wi < n_workers; ++wi) threads.emplace_back(work, wi);
    work(0);
    for (auto& t : threads) t.join();
    if (!first_error.empty()) return fail(first_error);
    return 0;
}

// Number of registered kernels, and the i-th name (for listing and tests).
size_t emu_kernel_count() { return emu::registry().size(); }
const char* emu_kernel_name(size_t i) {
    auto it = emu::registry().begin();
    std::advance(it, i);
    return it->first.c_str();
}
}
