// Kernel registry of the emulator: one EMU_REGISTER(kernel) line per kernel maps its name to a trampoline
// that unpacks a `void** args` array exactly as cuLaunchKernel does.
#pragma once
#include <cstddef>
#include <tuple>
#include <utility>

namespace emu {
using Trampoline = void (*)(void* kernel, void** args);

void register_kernel(const char* name, void* kernel, Trampoline trampoline);

template <typename... Args>
struct Unpack {
    template <std::size_t... I>
    static void call(void (*k)(Args...), void** args, std::index_sequence<I...>) {
        k(*static_cast<std::remove_reference_t<Args>*>(args[I])...);
    }
    static void run(void* kernel, void** args) {
        call(reinterpret_cast<void (*)(Args...)>(kernel), args, std::index_sequence_for<Args...>{});
    }
};

struct Registrar {
    template <typename... Args>
    Registrar(const char* name, void (*kernel)(Args...)) {
        register_kernel(name, reinterpret_cast<void*>(kernel), &Unpack<Args...>::run);
    }
};
}  // namespace emu
