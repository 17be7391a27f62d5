#include "metrics.h"

#include <algorithm>
#include <utility>

namespace fgr {

void Histogram::Observe(const std::vector<double>& bounds, double value) {
  if (buckets.empty()) buckets.assign(bounds.size() + 1, 0);
  // Prometheus buckets are "less than or equal": the first bound >= value.
  const size_t index = std::lower_bound(bounds.begin(), bounds.end(), value) - bounds.begin();
  ++buckets[index];
  sum += value;
  ++count;
}

Metrics::Metrics(std::vector<double> latency_bounds_us, std::vector<double> batch_bounds)
    : latency_bounds_(std::move(latency_bounds_us)), batch_bounds_(std::move(batch_bounds)) {}

void Metrics::RecordRequest(const std::string& model, const std::string& api, const std::string& entrypoint,
                            const std::string& status, double latency_us) {
  std::lock_guard<std::mutex> lock(mutex_);
  requests_[RequestKey(model, api, entrypoint, status)].Observe(latency_bounds_, latency_us);
}

void Metrics::RecordBatch(const std::string& model, int64_t rows, int64_t padding) {
  std::lock_guard<std::mutex> lock(mutex_);
  BatchStats& stats = batches_[model];
  stats.rows.Observe(batch_bounds_, static_cast<double>(rows));
  stats.padding.Observe(batch_bounds_, static_cast<double>(padding));
}

void Metrics::Snapshot(std::map<RequestKey, Histogram>* requests, std::map<std::string, BatchStats>* batches) {
  std::lock_guard<std::mutex> lock(mutex_);
  *requests = requests_;
  *batches = batches_;
}

const char* CodeName(int code) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  return code >= 0 && code < 17 ? kNames[code] : "UNKNOWN";
}

}  // namespace fgr
