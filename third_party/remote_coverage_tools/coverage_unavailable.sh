#!/bin/sh
# Stand-in for Bazel's coverage tools (see BUILD): reached only by `bazel coverage`.
echo "bazel coverage is not available in this offline build (remote_coverage_tools is a stand-in;" \
     "see third_party/remote_coverage_tools/BUILD). Measure coverage outside Bazel." >&2
exit 1
