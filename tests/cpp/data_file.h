// Reads tests/cpp/data/common_cases.txt (written by tests/cpp/make_data.py, whose docstring describes
// the records): one record a line, whitespace-separated, the first word its kind; '#' lines are
// comments. Floats are Python repr()s, read back exactly by strtod (nan and inf included).
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastdiff_test {

using Record = std::vector<std::string>;  // the words after the kind

inline double parse_double(const std::string& s) {
  const char* begin = s.c_str();
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(begin, &end);
  if (end == begin || *end != '\0' || errno == ERANGE) {
    throw std::runtime_error("not a float: '" + s + "'");
  }
  return v;
}

inline uint64_t parse_u64(const std::string& s, int base = 10) {
  const char* begin = s.c_str();
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(begin, &end, base);
  if (end == begin || *end != '\0' || errno == ERANGE || s[0] == '-') {
    throw std::runtime_error("not an unsigned integer: '" + s + "'");
  }
  return static_cast<uint64_t>(v);
}

inline bool parse_flag(const std::string& s) {
  if (s != "0" && s != "1") {
    throw std::runtime_error("not a 0/1 flag: '" + s + "'");
  }
  return s == "1";
}

class DataFile {
 public:
  // Throws std::runtime_error on a file that cannot be read, or whose "end" record is missing or
  // does not count the records above it.
  explicit DataFile(const std::string& path) {
    std::ifstream in(path);
    if (!in) {
      throw std::runtime_error("cannot open data file '" + path + "'");
    }
    std::string line;
    bool ended = false;
    while (std::getline(in, line)) {
      if (line.empty() || line[0] == '#') {
        continue;
      }
      if (ended) {
        throw std::runtime_error("record after 'end': " + line);
      }
      std::istringstream words(line);
      std::string kind, word;
      words >> kind;
      Record rec;
      while (words >> word) {
        rec.push_back(word);
      }
      if (kind == "end") {
        ended = true;
        if (rec.size() != 3 || parse_u64(rec[0]) != records("philox").size() ||
            parse_u64(rec[1]) != records("row").size() || parse_u64(rec[2]) != records("case").size()) {
          throw std::runtime_error("the 'end' record does not count the records above it: " + line);
        }
        continue;
      }
      records_[kind].push_back(rec);
    }
    if (!ended) {
      throw std::runtime_error("no 'end' record: '" + path + "' is truncated");
    }
  }

  const std::vector<Record>& records(const std::string& kind) const {
    static const std::vector<Record> none;
    const auto it = records_.find(kind);
    return it == records_.end() ? none : it->second;
  }

 private:
  std::map<std::string, std::vector<Record>> records_;
};

}  // namespace fastdiff_test
