// libFuzzer target: both genotype parsers (the DARTS text form and the JSON form) on the same
// bytes. Accepted genotypes must be valid and survive a round trip through both forms.
// Any exception other than noisydarts::ConfigError, any sanitizer report or a failed round
// trip is a bug.
#include <cstdint>
#include <cstdlib>
#include <string>

#include <nlohmann/json.hpp>

#include "noisydarts/error.h"
#include "noisydarts/genotype.h"

namespace nd = noisydarts;

namespace {
void check_round_trip(const nd::Genotype& g) {
  nd::validate_genotype(g);  // throws ConfigError: an accepted genotype must be valid
  if (!(nd::genotype_from_text(nd::genotype_to_text(g)) == g)) std::abort();
  if (!(nd::genotype_from_json(nd::genotype_to_json(g)) == g)) std::abort();
  (void)nd::cell_to_dot(g.normal, g.normal_concat, "normal");
  (void)nd::cell_to_dot(g.reduce, g.reduce_concat, "reduce");
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    check_round_trip(nd::genotype_from_text(text));
  } catch (const nd::ConfigError&) {
  }
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_discarded()) {
    try {
      check_round_trip(nd::genotype_from_json(j));
    } catch (const nd::ConfigError&) {
    }
  }
  return 0;
}
