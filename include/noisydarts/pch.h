// Precompiled header: <torch/torch.h> costs ~15 s per translation unit on 2 cores.
#pragma once
#include <torch/torch.h>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>
#include <map>
#include <memory>
#include <functional>
