// The binary's allocator: jemalloc, told never to give freed pages back to the kernel
// (`dirty_decay_ms:-1`): the denoising loop frees and reallocates the same large activations
// every step, and each page handed back costs a page fault when it is taken again. glibc's
// malloc unmaps every block over 32 MiB at once; at batch 8 and 512² that was 12.6 million
// faults and 19.6 s of system time per 72.7 s step (BENCHMARKS.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at start-up under the name its prefixed build looks for.
#[cfg(not(target_env = "msvc"))]
#[allow(unsafe_code)] // an exported symbol: jemalloc reads it as `const char *malloc_conf`
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8; 36] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1\0";

fn main() -> std::process::ExitCode {
    sd_studio::cli::main()
}
