/* The hello image's program: one write, no libc start-up beyond the
 * static binary's own. */
#include <unistd.h>

int main(void)
{
    static const char greeting[] = "Hello from a Kiln microVM!\n";
    return write(STDOUT_FILENO, greeting, sizeof greeting - 1) == sizeof greeting - 1 ? 0 : 1;
}
