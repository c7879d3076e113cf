#define PCRE2_CODE_UNIT_WIDTH 8
#include "pcre_regex.h"

#include <pcre2.h>

#include "error.h"

namespace tmkit {

struct Regex::Impl {
  pcre2_code* code = nullptr;
  bool jit = false;
};

Regex::Regex(const std::string& pattern) : impl_(std::make_unique<Impl>()) {
  int err = 0;
  PCRE2_SIZE offset = 0;
  impl_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                              &err, &offset, nullptr);
  if (!impl_->code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    fail("regex '{}' at offset {}: {}", pattern, offset, reinterpret_cast<const char*>(msg));
  }
  impl_->jit = pcre2_jit_compile(impl_->code, PCRE2_JIT_COMPLETE) == 0;
}

Regex::~Regex() {
  if (impl_->code) pcre2_code_free(impl_->code);
}

void Regex::for_each_match(std::string_view s, const std::function<void(size_t, size_t)>& on_match) const {
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(impl_->code, nullptr);
  pcre2_jit_stack* stack = impl_->jit ? pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr) : nullptr;
  pcre2_match_context* ctx = pcre2_match_context_create(nullptr);
  if (stack) pcre2_jit_stack_assign(ctx, nullptr, stack);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  size_t pos = 0;
  int rc = 0;
  while (pos <= s.size()) {
    rc = pcre2_match(impl_->code, subject, s.size(), pos, PCRE2_NO_UTF_CHECK, md, ctx);
    if (rc < 0) break;
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    size_t b = ov[0], e = ov[1];
    if (e == b) {  // empty match: step over one character
      size_t step = 1;
      while (b + step < s.size() && (static_cast<unsigned char>(s[b + step]) & 0xc0) == 0x80) ++step;
      pos = b + step;
      continue;
    }
    on_match(b, e);
    pos = e;
  }
  pcre2_match_context_free(ctx);
  if (stack) pcre2_jit_stack_free(stack);
  pcre2_match_data_free(md);
  if (rc < 0 && rc != PCRE2_ERROR_NOMATCH) fail("regex match failed with PCRE2 error {}", rc);
}

}  // namespace tmkit
