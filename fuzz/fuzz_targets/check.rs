// Shared invariant check of a tensor table accepted by a reader (included by the format targets).

use vram_residency::format::TensorTable;

/// A table the reader accepted must describe tensors inside the file, sorted and not overlapping.
pub fn check_table(table: &TensorTable, file_len: u64) {
    let mut end_of_previous = table.data_offset;
    for tensor in &table.tensors {
        let end = tensor.offset.checked_add(tensor.bytes).expect("tensor end overflows");
        assert!(end <= file_len, "tensor {} ends past the file", tensor.name);
        if tensor.bytes > 0 {
            assert!(tensor.offset >= end_of_previous, "tensor {} overlaps or precedes the data section", tensor.name);
            end_of_previous = end;
        }
    }
    // The canonical encoding and digest must be computable for anything accepted.
    let _ = table.digest();
}
