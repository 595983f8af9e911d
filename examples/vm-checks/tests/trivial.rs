//! 32 tests that do nothing, for the bench's `isolate-32` figure: each in a VM of its own
//! (`cargo xtask test --isolate`) against all in one VM.
//!
//!     cargo xtask test --isolate -p vm-checks --test trivial -- --ignored

macro_rules! trivial {
    ($($name:ident)*) => {$(
        #[test]
        #[ignore = "for the bench: cargo xtask test --isolate -p vm-checks --test trivial -- --ignored"]
        fn $name() {}
    )*};
}

trivial! {
    t00 t01 t02 t03 t04 t05 t06 t07 t08 t09 t10 t11 t12 t13 t14 t15
    t16 t17 t18 t19 t20 t21 t22 t23 t24 t25 t26 t27 t28 t29 t30 t31
}
