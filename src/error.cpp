#include "noisydarts/error.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <sys/stat.h>
#include <unistd.h>

namespace noisydarts {

void write_file_atomic(const std::string& path, const std::string& content) {
  // Renaming over a device (e.g. /dev/full), a FIFO or a directory would replace or fail on
  // it after the data were written: refuse up front instead.
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
    throw IoError("cannot write " + path + ": it exists and is not a regular file (choose a file path)");
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw IoError("cannot write " + path + ": " + std::strerror(errno));
  const bool ok = std::fwrite(content.data(), 1, content.size(), f) == content.size() &&
                  std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0;
  const int err = errno;
  if (std::fclose(f) != 0 || !ok) {
    std::remove(tmp.c_str());
    throw IoError("cannot write " + path + ": " + std::strerror(ok ? errno : err) +
                  " (disk full or not writable?)");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    throw IoError("cannot write " + path + ": " + std::strerror(e));
  }
}

}  // namespace noisydarts
