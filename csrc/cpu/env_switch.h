// On/off experiment switches read from the environment (A/B runs; read per call).
#pragma once

#include <cctype>
#include <cstdlib>
#include <cstring>

namespace bsbert {
namespace cpu {

// false when `name` is set to 0 / false / no / off (any case, surrounding spaces ignored: the spellings
// bsbert's Python switches take), true otherwise, unset included. Testing only the first character left
// "false" and "off" switched on.
inline bool env_switch_on(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr) return true;
  while (*env == ' ' || *env == '\t') ++env;
  char v[8] = {0};
  int n = 0;
  for (; env[n] != '\0' && n < 7; ++n) v[n] = static_cast<char>(std::tolower(static_cast<unsigned char>(env[n])));
  if (env[n] != '\0') return true;  // longer than any "off" spelling
  while (n > 0 && (v[n - 1] == ' ' || v[n - 1] == '\t')) v[--n] = '\0';
  return !(std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 || std::strcmp(v, "no") == 0 ||
           std::strcmp(v, "off") == 0);
}

}  // namespace cpu
}  // namespace bsbert
