# The closing line of scripts/test and scripts/gpu-test, over the output of any number of libtest
# binaries: `tests: P passed, F failed, S skipped`. Libtest prints one `test result:` line per binary;
# a test that cannot run here (no GPU, no oracle) still "passes" for libtest but prints a line
# `skipped: REASON: TEST` (tests/api/support.rs `skip`), so it counts as skipped, not passed.
/^test result:/ {
    for (i = 1; i < NF; i++) {
        if ($(i+1) ~ /^passed/) passed += $i
        if ($(i+1) ~ /^failed/) failed += $i
        if ($(i+1) ~ /^ignored/) ignored += $i
    }
}
/^skipped: / { skipped++ }
END { printf "tests: %d passed, %d failed, %d skipped\n", passed - skipped, failed, ignored + skipped }
