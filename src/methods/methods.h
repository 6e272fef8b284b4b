#pragma once
// The constructors of the methods, one file each in src/methods/ (registered in src/method.cpp).
#include <memory>

#include "noisydarts/method.h"

namespace noisydarts::methods {

std::shared_ptr<SearchMethod> make_fair_darts(const SearchConfig& cfg);
std::shared_ptr<SearchMethod> make_pc_darts(const SearchConfig& cfg);
std::shared_ptr<SearchMethod> make_sdarts_rs(const SearchConfig& cfg);
std::shared_ptr<SearchMethod> make_sdarts_adv(const SearchConfig& cfg);
std::shared_ptr<SearchMethod> make_darts_minus(const SearchConfig& cfg);
std::shared_ptr<SearchMethod> make_beta_darts(const SearchConfig& cfg);
std::shared_ptr<SearchMethod> make_gdas(const SearchConfig& cfg);
std::shared_ptr<SearchMethod> make_drnas(const SearchConfig& cfg);

}  // namespace noisydarts::methods
