#pragma once
// The constructors of the methods, one file each in src/methods/ (registered in src/method.cpp).
#include <memory>

#include "noisydarts/method.h"

namespace noisydarts::methods {

/// A method's scalar that runs linearly from `start` to `end` over the search (method.h
/// schedule_progress; `inclusive`: schedule_progress_inclusive), logged and checkpointed as
/// {key: value}.
struct LinearSchedule {
  std::string key;
  double start = 0, end = 0;
  bool inclusive = false;
  double value = start;
  LinearSchedule(std::string k, double s, double e, bool incl = false) : key(std::move(k)), start(s), end(e), inclusive(incl), value(s) {}
  void at(int64_t epoch, int64_t epochs) {
    value = linear_schedule(start, end, inclusive ? schedule_progress_inclusive(epoch, epochs) : schedule_progress(epoch, epochs));
  }
  nlohmann::json state() const { return {{key, value}}; }
  void load(const nlohmann::json& s) { value = s.at(key).get<double>(); }
};

std::shared_ptr<SearchMethod> make_fair_darts(const SearchConfig& cfg);
std::shared_ptr<SearchMethod> make_pc_darts(const SearchConfig& cfg);
std::shared_ptr<SearchMethod> make_sdarts_rs(const SearchConfig& cfg);
std::shared_ptr<SearchMethod> make_sdarts_adv(const SearchConfig& cfg);
std::shared_ptr<SearchMethod> make_darts_minus(const SearchConfig& cfg);
std::shared_ptr<SearchMethod> make_beta_darts(const SearchConfig& cfg);
std::shared_ptr<SearchMethod> make_gdas(const SearchConfig& cfg);
std::shared_ptr<SearchMethod> make_drnas(const SearchConfig& cfg);

}  // namespace noisydarts::methods
