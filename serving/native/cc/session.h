// One loaded SavedModel version: TensorFlow's C++ loader and Session::Run, through the C API.
#ifndef FGR_NATIVE_SESSION_H_
#define FGR_NATIVE_SESSION_H_

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "status.h"
#include "tensor.h"
#include "tf_api.h"

namespace fgr {

class Session {
 public:
  // TF_LoadSessionFromSavedModel: restores the variables and runs the init op with the version's
  // asset paths, as TF Serving's loader does. `config` is a serialized ConfigProto.
  static std::unique_ptr<Session> Load(const std::string& export_dir, const std::vector<std::string>& tags,
                                       const std::string& config, Status* status);
  ~Session();

  // The serialized MetaGraphDef the loader used.
  const std::string& meta_graph_def() const { return meta_graph_def_; }

  // Runs fetches given feeds, both by tensor name ("op:0"); thread-safe. A fetch that is also fed
  // answers with the fed value (the C API refuses such a run; Session.run allows it).
  // in_caller_thread: RunOptions.inter_op_thread_pool = -1.
  //
  // There is no timeout: a run, once started, is not cut short at its call's deadline. TF cuts runs
  // only through RunOptions.timeout_in_ms, which sends a run down DirectSession's asynchronous path;
  // there, in TF 2.20, every run failing inside the graph leaks its aborted rendezvous (~0.7 KB;
  // serving/README.md, "Deadlines"). Deadlines are kept before the run instead: a call past its
  // deadline is answered DEADLINE_EXCEEDED at once and its run skipped, or its rows left out of a batch.
  Status Run(const std::vector<std::string>& feed_names, const std::vector<TensorPtr>& feeds,
             const std::vector<std::string>& fetch_names, bool in_caller_thread, std::vector<TensorPtr>* outputs);

  // Refuses new runs (UNAVAILABLE), waits for the ones in flight, then closes the session.
  void Close();

 private:
  Session(TF_Session* session, TF_Graph* graph, std::string meta_graph_def);
  Status Resolve(const std::string& name, TF_Output* output, std::string* canonical);

  TF_Session* session_;
  TF_Graph* graph_;
  const std::string meta_graph_def_;
  std::mutex mutex_;
  std::condition_variable idle_;
  int in_flight_ = 0;
  bool closed_ = false;
  std::unordered_map<std::string, std::pair<TF_Output, std::string>> resolved_;  // Under mutex_.
};

}  // namespace fgr

#endif  // FGR_NATIVE_SESSION_H_
