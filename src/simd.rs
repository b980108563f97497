//! Run-time dispatch of hot loops to AVX2.
//!
//! The merge's hot loops are plain slice loops that LLVM vectorises. Built for the baseline
//! x86-64 target they use SSE2 (4 `f32` lanes); [`avx2_fn!`] compiles such a function a second
//! time inside a `#[target_feature(enable = "avx2")]` wrapper (8 lanes) and picks it at run time
//! when the CPU has AVX2. Results are identical: the same operations in the same order, and
//! Rust never contracts a multiply and an add into a fused multiply-add on its own.

/// Whether the CPU has AVX2 (the standard library caches the check).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

/// `avx2_fn!(vis fn name(args) -> ret => body_fn);` defines `name`, which calls `body_fn` (an
/// `#[inline(always)]` function with the same arguments) compiled for AVX2 when the CPU has it,
/// and as is otherwise.
macro_rules! avx2_fn {
    ($vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path) => {
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if $crate::simd::has_avx2() {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use avx2_fn;
