"""Bad input to ``quantship bench``: one row per case (see :mod:`bad_inputs.table`)."""

from __future__ import annotations

import pytest

from bad_inputs.table import Case, bench_argv, params, run_case, two_tflite

CASES = [
    # --- remote device (issue 22): refused before any connection or heavy work
    *[
        Case(f"remote-{name}", ("bench", "--artifact", "{tmp}/m.onnx", "--out", "{out}", *extra), 2, message)
        for name, extra, message in (
            ("url-empty", ("--remote", ""), "--remote: empty URL"),
            ("url-no-scheme", ("--remote", "pi@raspberrypi"), "expected ssh://[user@]host[:port]"),
            ("url-scheme", ("--remote", "http://pi"), "unknown scheme 'http'"),
            ("url-password", ("--remote", "ssh://pi:secret@pi"), "put no password in the URL"),
            ("url-path", ("--remote", "ssh://pi/home/pi"), "has no path or query"),
            ("url-port-zero", ("--remote", "ssh://pi:0"), "port must be 1..65535"),
            ("url-port-huge", ("--remote", "ssh://pi:99999"), "Port out of range"),
            ("url-port-nan", ("--remote", "ssh://pi:NaN"), "expected ssh://"),
            ("url-option-host", ("--remote", "ssh://-oProxyCommand=x"), "no valid host name"),
            ("python-empty", ("--remote", "ssh://pi", "--remote-python", ""), "--remote-python: give"),
            ("key-missing", ("--remote", "ssh://pi", "--ssh-key", "{tmp}/none"), "--ssh-key {tmp}/none: no such file"),
            ("key-empty", ("--remote", "ssh://pi", "--ssh-key", ""), "no such file"),
            ("option-no-value", ("--remote", "ssh://pi", "--ssh-option", "Port"), "expected KEY=VALUE"),
            ("option-empty", ("--remote", "ssh://pi", "--ssh-option", ""), "expected KEY=VALUE"),
            ("option-hostkey-off", ("--remote", "ssh://pi", "--ssh-option", "StrictHostKeyChecking=no"), "stays on"),
            ("option-batchmode", ("--remote", "ssh://pi", "--ssh-option", "BatchMode=no"), "never prompts"),
            ("no-cache-alone", ("--remote-no-cache",), "--remote-no-cache go(es) with --remote URL"),
            ("timeout-alone", ("--remote-timeout", "60"), "--remote-timeout go(es) with --remote URL"),
            *(
                (f"timeout-{name}", ("--remote", "ssh://pi", "--remote-timeout", value), "--remote-timeout: expected")
                for name, value in (("zero", "0"), ("negative", "-5"), ("nan", "nan"), ("inf", "inf"), ("text", "1m"))
            ),
            ("timeout-huge", ("--remote", "ssh://pi", "--remote-timeout", "1e9"), "expected seconds in (0, 604800]"),
            ("loadgen", ("--remote", "ssh://pi", "--loadgen", "offline"), "--loadgen runs MLPerf LoadGen"),
            ("mobile", ("--remote", "ssh://pi", "--mobile"), "--mobile pins this machine's cores"),
            ("unreachable", ("--remote", "ssh://127.0.0.1:1", "--ssh-option", "ConnectTimeout=5"), "unreachable"),
        )
    ],
    Case(
        "remote-bench-keras",
        ("bench", "--model", "mobilenet_v2", "--targets", "keras-fp32", "--remote", "ssh://pi", "--out", "{out}"),
        2,
        "keras-fp32 runs in TensorFlow",
        subprocess=True,
    ),
    # --- bench: interleaved timing options (issue 23); refused before anything is timed
    *(
        Case(f"bench-{name}", bench_argv(*extra), 2, message, build=two_tflite)
        for name, extra, message in (
            ("reference-unknown", ("--reference", "zzz"), "--reference zzz is none of the configurations to bench"),
            ("reference-empty", ("--reference", ""), "--reference is empty"),
            ("ratio-precision-0", ("--ratio-precision", "0"), "--ratio-precision must be a fraction between 0 and 1"),
            ("ratio-precision-1", ("--ratio-precision", "1"), "--ratio-precision must be a fraction between 0 and 1"),
            ("ratio-precision-neg", ("--ratio-precision=-0.1",), "--ratio-precision must be a fraction between"),
            ("ratio-precision-nan", ("--ratio-precision", "nan"), "--ratio-precision must be a fraction between"),
            ("ratio-precision-huge", ("--ratio-precision", "1e300"), "--ratio-precision must be a fraction between"),
            ("ratio-precision-word", ("--ratio-precision", "tight"), "argument --ratio-precision: invalid float"),
            ("ratio-precision-empty", ("--ratio-precision", ""), "argument --ratio-precision: invalid float"),
            ("min-rounds-1", ("--min-rounds", "1"), "--min-rounds must be at least 2"),
            ("min-rounds-neg", ("--min-rounds=-3",), "--min-rounds must be at least 2"),
            ("min-rounds-float", ("--min-rounds", "2.5"), "argument --min-rounds: invalid int value"),
            ("max-seconds-0", ("--max-seconds", "0"), "--max-seconds must be a positive number of seconds"),
            ("max-seconds-inf", ("--max-seconds", "inf"), "--max-seconds must be a positive number of seconds"),
            ("max-seconds-nan", ("--max-seconds", "nan"), "--max-seconds must be a positive number of seconds"),
            ("queries-per-round-0", ("--queries-per-round", "0"), "argument --queries-per-round: expected a positive"),
        )
    ),
    Case(
        "bench-reference-fails-to-run",
        bench_argv("--reference", "{tmp}/a-fp32.tflite"),
        2,
        "the reference a-fp32 ({tmp}/a-fp32.tflite) failed to run",
        build=two_tflite,
    ),
    Case(
        "loadgen-empty",
        ("bench", "--artifact", "{tmp}/m.tflite", "--loadgen", "", "--out", "{out}"),
        2,
        "argument --loadgen: expected LoadGen scenario, got an empty text",
    ),
    Case(
        "loadgen-stray-comma",
        ("bench", "--artifact", "{tmp}/m.tflite", "--loadgen", "singlestream,", "--out", "{out}"),
        2,
        "argument --loadgen: an empty name in 'singlestream,'",
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, request, tmp_path, capfd):
    run_case(case, request, tmp_path, capfd)
