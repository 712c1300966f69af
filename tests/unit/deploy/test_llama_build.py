from deploy.llama_build import cmake_args, cpu_flags

# The flags line of the Sapphire Rapids VMs where the native build faulted (shortened).
XEON = (
    "processor\t: 0\nflags\t\t: fpu sse4_2 avx f16c fma bmi2 avx2 avx_vnni avx512f avx512cd "
    "avx512vl avx512dq avx512bw avx512vbmi avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
)


def test_a_cpu_with_amx_gets_its_vector_sets_and_no_amx():
    args = cmake_args(cpu_flags(XEON), "x86_64")
    assert "-DGGML_NATIVE=OFF" in args
    for option in ("GGML_AVX2", "GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"):
        assert f"-D{option}=ON" in args
    assert [a for a in args if "AMX" in a] == [
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
    ]


def test_avx512_needs_all_five_subsets():
    flags = cpu_flags(XEON) - {"avx512dq"}
    assert "-DGGML_AVX512=OFF" in cmake_args(flags, "x86_64")


def test_an_avx2_only_cpu_and_arm():
    args = cmake_args({"avx", "avx2", "fma", "f16c"}, "x86_64")
    assert "-DGGML_AVX2=ON" in args and "-DGGML_AVX512=OFF" in args
    assert cmake_args(set(), "aarch64") == []
