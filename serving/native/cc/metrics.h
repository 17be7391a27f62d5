// Request and batch metrics counted natively and read by Python's Prometheus collector at scrape
// time, so a request answered natively never takes the GIL to be counted.
#ifndef FGR_NATIVE_METRICS_H_
#define FGR_NATIVE_METRICS_H_

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace fgr {

// A histogram with fixed bounds: non-cumulative counts per bound, then one for +Inf.
struct Histogram {
  std::vector<uint64_t> buckets;
  double sum = 0;
  uint64_t count = 0;

  void Observe(const std::vector<double>& bounds, double value);
};

class Metrics {
 public:
  Metrics(std::vector<double> latency_bounds_us, std::vector<double> batch_bounds);

  void RecordRequest(const std::string& model, const std::string& api, const std::string& entrypoint,
                     const std::string& status, double latency_us);
  void RecordBatch(const std::string& model, int64_t rows, int64_t padding);

  using RequestKey = std::tuple<std::string, std::string, std::string, std::string>;
  struct BatchStats {
    Histogram rows, padding;
  };
  // Copies of the cumulative counts.
  void Snapshot(std::map<RequestKey, Histogram>* requests, std::map<std::string, BatchStats>* batches);

 private:
  const std::vector<double> latency_bounds_, batch_bounds_;
  std::mutex mutex_;
  std::map<RequestKey, Histogram> requests_;
  std::map<std::string, BatchStats> batches_;
};

// The gRPC name of a status code ("OK", "INVALID_ARGUMENT", ...), as the Python path labels it.
const char* CodeName(int code);

}  // namespace fgr

#endif  // FGR_NATIVE_METRICS_H_
